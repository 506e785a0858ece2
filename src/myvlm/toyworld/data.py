"""Personalization data from the toy world: per-concept train/held-out splits and the on-disk MyVLM dataset layout."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from myvlm.toyworld.world import Concept, Scene, caption, make_concepts, render_scene, sample_scene, with_names

CONCEPT_SEED_BASE = 1 << 41  # concept scenes live in their own seed range, apart from pretraining and held-out scenes


@dataclass(frozen=True)
class Example:
    """An image with its scene graph, its personalized caption (identifiers as subjects) and its base caption."""

    image: Image.Image
    scene: Scene

    @property
    def caption(self) -> str:
        return caption(self.scene)

    @property
    def base_caption(self) -> str:
        return caption(with_names(self.scene, {}))


@dataclass(frozen=True)
class ConceptData:
    """What personalizing one concept needs: 4 train images, unseen positives, negatives and hard negatives."""

    concept: Concept
    train: list[Example]
    positives: list[Example]
    negatives: list[Example]
    hard_negatives: list[Example]


def _example(seed: int, **kwargs) -> Example:
    scene = sample_scene(seed, **kwargs)
    return Example(render_scene(scene), scene)


def concept_data(
    n_concepts: int = 2,
    seed: int = 0,
    n_train: int = 4,
    n_positives: int = 20,
    n_negatives: int = 20,
    n_hard_negatives: int = 10,
) -> list[ConceptData]:
    """Splits for the first n concepts of this seed; every image is a different scene (position, scale, companions)."""
    out = []
    for k, concept in enumerate(make_concepts(n_concepts, seed)):
        base = CONCEPT_SEED_BASE + seed * 1_000_000 + k * 10_000

        def split(offset: int, count: int, base=base, **kwargs) -> list[Example]:
            return [_example(base + offset + i, **kwargs) for i in range(count)]

        out.append(
            ConceptData(
                concept,
                split(0, n_train, concepts=(concept,)),
                split(1000, n_positives, concepts=(concept,)),
                split(2000, n_negatives),
                split(3000, n_hard_negatives, hard_negative_of=concept),
            )
        )
    return out


def two_concept_examples(concepts: list[Concept], n: int = 10, seed: int = 0, training: bool = False) -> list[Example]:
    """Scenes holding the first two concepts together: held-out ones, or (``training``) photos to train them on."""
    base = CONCEPT_SEED_BASE + seed * 1_000_000 + (800_000 if training else 900_000)
    return [_example(base + i, concepts=tuple(concepts[:2])) for i in range(n)]


LAYOUTS = ("myvlm", "yollava", "both")


def export_dataset(out_dir, n_concepts: int = 2, seed: int = 0, layout: str = "myvlm") -> Path:
    """Write a personalization dataset in the MyVLM layout (`layout="yollava"`: the Yo'LLaVA layout, see
    `export_yollava`; `"both"`: each in its own subfolder, `myvlm/` and `yollava/`) and return its folder.

    Layout (every folder of images has a ``captions.json``: image file name -> list of captions)::

        concepts.json                      identifier, description, shape/colour/mark of each concept
        scene_graphs.json                  "<folder>/<file>" -> scene graph (exact ground truth)
        <identifier>/*.png                 the 4 training photos of a concept (official MyVLM concept folder)
        <identifier>/positives/*.png       held-out photos of the concept in new scenes (personalized captions)
        <identifier>/hard_negatives/*.png  same shape and colour, without the distinguishing mark (base captions)
        negatives/*.png                    scenes without any concept (base captions)
        together/*.png                     8 training photos of the first two concepts together (n_concepts >= 2)
        two_concepts/*.png                 held-out scenes with the first two concepts (only when n_concepts >= 2)

    Personalized captions name the concept by its identifier in subject position; negatives keep base captions.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    out = Path(out_dir)
    if layout == "both":
        export_dataset(out / "myvlm", n_concepts, seed)
        export_dataset(out / "yollava", n_concepts, seed, layout="yollava")
        return out
    if layout == "yollava":
        return export_yollava(out, n_concepts, seed)
    out.mkdir(parents=True, exist_ok=True)
    data = concept_data(n_concepts, seed)
    graphs: dict[str, dict] = {}

    def write(folder: str, examples: list[Example], prefix: str, personalized: bool) -> None:
        path = out / folder
        path.mkdir(parents=True, exist_ok=True)
        captions = {}
        for i, ex in enumerate(examples):
            name = f"{prefix}{i:03d}.png"
            ex.image.save(path / name)
            captions[name] = [ex.caption if personalized else ex.base_caption]
            graphs[f"{folder}/{name}"] = ex.scene.to_dict()
        (path / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")

    for d in data:
        ident = d.concept.identifier
        write(ident, d.train, "train_", True)
        write(f"{ident}/positives", d.positives, "pos_", True)
        write(f"{ident}/hard_negatives", d.hard_negatives, "hard_", False)
    write("negatives", data[0].negatives, "neg_", False)
    if n_concepts >= 2:
        concepts = [d.concept for d in data]
        write("together", two_concept_examples(concepts, 8, seed, training=True), "together_", True)
        write("two_concepts", two_concept_examples(concepts, seed=seed), "pair_", True)
    _write_index(out, data, seed)
    (out / "scene_graphs.json").write_text(json.dumps(graphs, indent=1) + "\n")
    return out


def _write_index(out: Path, data: list[ConceptData], seed: int) -> None:
    """concepts.json: identifier, description, class word (the shape, the word base captions use) and attributes."""
    index = [
        {
            "identifier": d.concept.identifier,
            "description": d.concept.describe(),
            "class_word": d.concept.shape,
            "shape": d.concept.shape,
            "color": d.concept.color,
            "mark": d.concept.mark,
        }
        for d in data
    ]
    (out / "concepts.json").write_text(json.dumps({"seed": seed, "concepts": index}, indent=2) + "\n")


def export_yollava(out_dir, n_concepts: int = 2, seed: int = 0, n_test: int = 10) -> Path:
    """Write the toy world in the layout of Yo'LLaVA's released data and return its folder::

        train/<identifier>/*.png + captions.json   the 4 training photos (Yo'LLaVA ships no captions; myvlm reads
                                                   them where present)
        test/<identifier>/*.png                    held-out photos of the concept; every other concept's test photos
                                                   are its negatives
        yollava-visual-qa.json                     identifier -> "test/<identifier>/<file>" -> {"question",
                                                   "options": {"A", "B"}, "correct_answer"}
        concepts.json                              as in the MyVLM layout

    Questions ask the concept's colour and shape, one right and one wrong option each (A and B alternate)."""
    out = Path(out_dir)
    data = concept_data(n_concepts, seed, n_positives=n_test, n_negatives=0, n_hard_negatives=0)
    questions: dict[str, dict] = {}
    for k, d in enumerate(data):
        ident = d.concept.identifier
        train = out / "train" / ident
        train.mkdir(parents=True, exist_ok=True)
        captions = {}
        for i, ex in enumerate(d.train):
            ex.image.save(train / f"{i}.png")
            captions[f"{i}.png"] = [ex.caption]
        (train / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
        test = out / "test" / ident
        test.mkdir(parents=True, exist_ok=True)
        other = data[(k + 1) % len(data)].concept if len(data) > 1 else d.concept
        wrong = {"color": other.color if other.color != d.concept.color else "gray"}
        wrong["shape"] = other.shape if other.shape != d.concept.shape else "cloud"
        questions[ident] = {}
        for i, ex in enumerate(d.positives):
            ex.image.save(test / f"{i}.png")
            attribute = ("color", "shape")[i % 2]
            right = getattr(d.concept, attribute)
            options = (right, wrong[attribute]) if i % 4 < 2 else (wrong[attribute], right)
            questions[ident][f"test/{ident}/{i}.png"] = {
                "question": f"What {attribute} is {ident}?",
                "options": {"A": options[0], "B": options[1]},
                "correct_answer": "A" if options[0] == right else "B",
            }
    (out / "yollava-visual-qa.json").write_text(json.dumps(questions, indent=2) + "\n")
    _write_index(out, data, seed)
    return out
