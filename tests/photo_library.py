"""A toyworld photo library for the library-job tests and benchmark: nested folders of rendered scenes (every tenth
shows the concept), a few corrupt files, and a concept library whose head finds the concept and whose embedding
names it for toy-llava."""

from __future__ import annotations

from pathlib import Path

import torch

from myvlm.library import ConceptLibrary, build_head
from myvlm.toyworld import concept_data, reference_vector, render_scene, sample_scene
from myvlm.toyworld.data import CONCEPT_SEED_BASE

CORRUPT = {"a/broken.png": b"\x89PNG\r\n\x1a\n truncated", "b/c/notes.jpg": b"not a photo", "b/empty.png": b""}


def photo_folder(root: Path, count: int, corrupt: bool = True) -> Path:
    """`count` toyworld photos in nested folders (a/, b/, b/c/), plus three unreadable files when `corrupt`."""
    concept = concept_data(1)[0].concept
    folders = [root / "a", root / "b", root / "b" / "c"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        seed = CONCEPT_SEED_BASE + 500_000 + index
        scene = sample_scene(seed, concepts=(concept,)) if index % 10 == 0 else sample_scene(seed)
        render_scene(scene).save(folders[index % 3] / f"photo_{index:05d}.png")
    if corrupt:
        for name, data in CORRUPT.items():
            (root / name).write_bytes(data)
    return root


def concept_library(root: Path, model_id: str = "toy-llava") -> ConceptLibrary:
    """One object concept with a vision-tower head and, for `model_id`, its pretraining reference vector."""
    from myvlm.model import load

    data = concept_data(1)[0]
    vlm = load(model_id)
    head = build_head(
        "object",
        [e.image for e in data.train],
        [e.image for e in data.hard_negatives[:4]],
        encoder=vlm.vision_encoder,
    )
    library = ConceptLibrary(root)
    name = data.concept.identifier
    library.create(name, kind="object", class_word=data.concept.shape, head=head)
    with torch.no_grad():
        vectors = [reference_vector(vlm.model, e.image, _concept_object(e.scene), name) for e in data.train]
    library.save_embedding(name, model_id, torch.stack(vectors).mean(0), family=vlm.family, task="caption")
    return library


def _concept_object(scene):
    return next(obj for obj in scene.objects if obj.concept)
