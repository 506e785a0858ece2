"""From a folder of photos to a trained concept: captions (given or written by the base model), VQA augmentation,
training, and storing the embedding in the library."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from myvlm.errors import MyVLMError
from myvlm.images import IMAGE_EXTENSIONS, load_image
from myvlm.library import Concept, ConceptLibrary
from myvlm.model import PersonalizedVLM, load
from myvlm.training import Example, TrainingConfig, learn_concept, learn_together, with_identifier, word_pattern

CAPTION_FILES = ("captions.json", "captions_augmented.json")
# Joint trainings tried (seeds seed, seed + 1, ...) until one names the concepts on every photo together; the best is
# kept. One run named both on 0.75 of unseen toy-blip2 scenes, with a spread from 0.4 to 1.0 (benchmarks/RESULTS.md).
TOGETHER_ATTEMPTS = 3
CHECKPOINT_EVERY = 10  # steps between saves of the best vector so far, so a crash or Ctrl-C loses little
# The official VQA augmentation asks the base model these about the concept's class, then names the concept.
VQA_QUESTIONS = (
    "What is the {cls} doing in the image?",
    "Where is the {cls} in the image?",
    "What color is the {cls}?",
)


def read_captions(path: Path) -> dict[str, list[str]]:
    """captions.json: image file name -> caption or list of captions."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MyVLMError(f"{path}: no such captions file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MyVLMError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict) or not raw:
        raise MyVLMError(f"{path}: expected an object mapping image file names to captions")
    captions = {}
    for name, value in raw.items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise MyVLMError(f"{path}: captions of '{name}' must be a non-empty string or list of strings")
        captions[name] = [v.strip() for v in values]
    return captions


def name_class_word(caption: str, class_word: str, identifier: str) -> str:
    """Replace the first 'a/the <adjectives> <class word>' phrase of a base caption by the identifier."""
    pattern = rf"\b(?:a|an|the)\s+(?:[\w-]+\s+){{0,3}}?{re.escape(class_word)}s?\b"
    named, count = re.subn(pattern, identifier, caption, count=1, flags=re.IGNORECASE)
    if not count:
        named, count = re.subn(rf"\b{re.escape(class_word)}\b", identifier, caption, count=1, flags=re.IGNORECASE)
    return named if count else ""


def training_photos(images: Sequence[str] | None, captions_file: str | None) -> tuple[list[Path], dict | None]:
    """The photos to train on and their captions, from --images and/or an official-layout captions.json."""
    captions = None
    if captions_file:
        captions_path = Path(captions_file)
        captions = read_captions(captions_path)
        if not images:
            paths = [captions_path.parent / name for name in captions]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise MyVLMError(f"{missing[0]}: listed in {captions_path} but missing")
            return paths, captions
    if not images:
        raise MyVLMError("give the training photos with --images, or a concept folder's captions.json with --captions")
    paths: list[Path] = []
    for raw in images:
        path = Path(raw)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS))
            if captions is None:
                for candidate in CAPTION_FILES:
                    if (path / candidate).is_file():
                        captions = read_captions(path / candidate)
                        break
        else:
            paths.append(path)
    if not paths:
        raise MyVLMError(f"no photos found in {', '.join(images)}")
    return paths, captions


def build_examples(
    vlm: PersonalizedVLM,
    concept: Concept,
    photos: list[Image.Image],
    names: list[str],
    captions: dict | None,
    task: str,
) -> list[Example]:
    """Captioning examples (given captions or base-model captions with the class word named), plus VQA pairs."""
    person = concept.kind == "person"
    examples = []
    if captions is not None:
        for index, name in enumerate(names):
            given = captions.get(name)
            if given is None:
                raise MyVLMError(f"{name}: no captions for this photo in the captions file")
            named = [with_identifier(c, concept.name, concept.identifier, person=person) for c in given]
            named = [c for c in named if word_pattern(concept.identifier).search(c)]
            if not named:
                wanted = " or ".join(f"'{word}'" for word in dict.fromkeys([concept.name, concept.identifier]))
                raise MyVLMError(f"{name}: no caption mentions {wanted}")
            examples.append(Example(index, tuple(named)))
    else:
        if not concept.class_word:
            raise MyVLMError(
                f"concept '{concept.name}' has no class word; give --captions, or set it with "
                f"`myvlm concept edit {concept.name} --class-word WORD`"
            )
        base = vlm.caption(photos, [[] for _ in photos], progress=True)
        for index, (name, caption) in enumerate(zip(names, base, strict=True)):
            named = name_class_word(caption.text, concept.class_word, concept.identifier)
            if not named:
                raise MyVLMError(
                    f"{name}: the base caption '{caption.text}' does not mention '{concept.class_word}'; give captions"
                )
            examples.append(Example(index, (named,)))
    if task == "vqa":
        examples.extend(vqa_examples(vlm, concept, photos))
    return examples


def vqa_examples(vlm: PersonalizedVLM, concept: Concept, photos: list[Image.Image]) -> list[Example]:
    """Ask the base model about the concept's class, then rephrase question and answer with the identifier."""
    cls = concept.class_word or "object"
    examples = []
    for question in VQA_QUESTIONS:
        for index, photo in enumerate(photos):
            answer = vlm.ask(photo, question.format(cls=cls), concepts=[]).text
            if not answer:
                continue
            named_answer = name_class_word(answer, cls, concept.identifier) or answer
            examples.append(
                Example(index, (named_answer,), question.format(cls=cls).replace(f"the {cls}", concept.identifier))
            )
    return examples


def train_concept(
    library: ConceptLibrary,
    name: str,
    model: str,
    *,
    task: str = "caption",
    captions: str | None = None,
    images: Sequence[str] | None = None,
    steps: int = 100,
    seed: int = 0,
    resume: bool = False,
    vlm: PersonalizedVLM | None = None,
) -> None:
    """Train and store the concept's embedding. The best vector so far is saved as an incomplete entry every
    CHECKPOINT_EVERY steps and on Ctrl-C; `resume` continues from it (with a fresh optimizer) up to `steps`."""
    concept = library.get(name)
    TrainingConfig(task=task, steps=steps, seed=seed)  # check the settings before loading anything
    paths, caption_map = training_photos(images, captions)
    photos = [load_image(p) for p in paths]
    vlm = vlm or load(model)
    done, init = 0, None
    if resume:
        done, init = resume_point(library, concept, vlm, task, steps)
    examples = build_examples(vlm, concept, photos, [p.name for p in paths], caption_map, task)
    info = {"family": vlm.family, "task": task, "seed": seed, "source": "myvlm"}
    best = {"loss": float("inf"), "vector": None, "steps": done}

    def save_best() -> None:
        if best["vector"] is not None:
            library.save_embedding(
                concept.name,
                vlm.model_id,
                best["vector"],
                **info,
                steps=best["steps"],
                final_loss=round(best["loss"], 4),
                complete=False,
            )

    def keep_best(step: int, loss: float, vector) -> None:
        if loss < best["loss"]:
            best.update(loss=loss, vector=vector, steps=done + step)
        if (step + 1) % CHECKPOINT_EVERY == 0:
            save_best()

    config = TrainingConfig(task=task, steps=steps - done, seed=seed)
    try:
        result = learn_concept(
            vlm, concept.name, concept.identifier, photos, examples, config, init=init, on_step=keep_best
        )
    except KeyboardInterrupt:
        save_best()
        if best["vector"] is None:
            raise
        raise KeyboardInterrupt(
            f"kept the best embedding of '{concept.name}' (step {best['steps']}, loss {best['loss']:.3f}); "
            "continue with `myvlm train ... --resume`"
        ) from None
    if result.steps_done == 0:
        raise MyVLMError(f"training of '{concept.name}' failed at the first step ({result.stopped_early})")
    total = done + result.steps_done
    library.save_embedding(
        concept.name,
        vlm.model_id,
        result.vector,
        **info,
        steps=total,
        final_loss=round(result.losses[-1], 4),
        complete=True,
        **({"stopped_early": result.stopped_early} if result.stopped_early else {}),
    )
    note = f" ({result.stopped_early})" if result.stopped_early else ""
    print(f"trained '{concept.name}' for {vlm.model_id}: {total} steps, loss {result.losses[-1]:.3f}{note}")


def together_photos(captions_files: Sequence[str], concepts: Sequence[Concept]):
    """(photos, examples, concepts each photo holds) from captions files that name the concepts in each photo."""
    images, examples, present = [], [], []
    seen: set[Path] = set()
    for captions_file in captions_files:
        captions_path = Path(captions_file)
        for name, given in read_captions(captions_path).items():
            path = captions_path.parent / name
            if (resolved := path.resolve()) in seen:  # the same photo listed in two captions files
                continue
            seen.add(resolved)
            named = given
            for concept in concepts:
                person = concept.kind == "person"
                named = [with_identifier(c, concept.name, concept.identifier, person=person) for c in named]
            holds = tuple(c.name for c in concepts if any(word_pattern(c.identifier).search(t) for t in named))
            if not holds:
                wanted = ", ".join(f"'{c.identifier}'" for c in concepts)
                raise MyVLMError(f"{path}: no caption names any of {wanted}")
            # A caption that leaves out a concept the photo holds would teach the model to leave it out.
            named = [t for t in named if all(word_pattern(c.identifier).search(t) for c in concepts if c.name in holds)]
            if not named:
                raise MyVLMError(f"{path}: its captions name different concepts; name all it shows in each caption")
            examples.append(Example(len(images), tuple(named)))
            images.append(load_image(path))
            present.append(holds)
    for concept in concepts:
        if not any(concept.name in holds for holds in present):
            raise MyVLMError(f"no caption names '{concept.identifier}'; add photos of {concept.name}")
    if not any(len(holds) > 1 for holds in present):
        raise MyVLMError("no photo's caption names two of the concepts; add photos that show them together")
    return images, examples, present


def train_together(
    library: ConceptLibrary,
    names: Sequence[str],
    model: str,
    *,
    captions: Sequence[str],
    steps: int = 100,
    seed: int = 0,
    vlm: PersonalizedVLM | None = None,
) -> None:
    """Fine-tune the embeddings of concepts already trained alone on photos that show them together (plus, best,
    their own photos), so that one caption names them all. The new embeddings are stored only if every step ran and
    they name the concepts on more of the photos together than the embeddings trained alone (toy-llava, which reads
    the identifiers from its prompt, already names both and only lost by it: benchmarks/RESULTS.md)."""
    if len(set(names)) != len(names):
        raise MyVLMError("each concept may be named once")
    concepts = [library.get(name) for name in names]
    TrainingConfig(steps=steps, seed=seed)  # check the settings before loading anything
    images, examples, present = together_photos(captions, concepts)
    vlm = vlm or load(model)
    entries, alone = {}, {}
    for concept in concepts:
        entry = concept.embeddings.get(vlm.model_id)
        if entry is None or not entry.get("complete", True):
            state = "no embedding" if entry is None else "an interrupted training"
            raise MyVLMError(
                f"concept '{concept.name}' has {state} for {vlm.model_id}; train it alone first "
                f"(myvlm train {concept.name} --model {model})"
            )
        entries[concept.name] = entry
        alone[concept.name] = library.load_embedding(concept.name, vlm.model_id, vlm.concept_width)
        vlm.add_concept(concept.name, concept.identifier, alone[concept.name])
    together = [i for i, holds in enumerate(present) if len(holds) > 1]
    photos_together, holds_together = [images[i] for i in together], [present[i] for i in together]
    before = best = named_together(vlm, photos_together, holds_together)
    joined, n_together = " + ".join(names), len(together)
    if before == n_together:
        print(f"kept the embeddings trained alone: they already name {joined} on all {n_together} photos together")
        return

    def hold(vectors: dict) -> None:
        for name, vector in vectors.items():
            vlm.concepts[name].vector = vector

    result, tries = None, []
    for attempt in range(TOGETHER_ATTEMPTS):
        hold(alone)
        config = TrainingConfig(steps=steps, seed=seed + attempt)
        trial = learn_together(vlm, list(names), images, examples, present, config)
        tries.append(named_together(vlm, photos_together, holds_together) if trial.steps_done == steps else -1)
        if tries[-1] > best:
            best, result, best_seed = tries[-1], trial, seed + attempt
        if best == n_together:
            break
    if result is None:
        hold(alone)
        print(
            f"kept the embeddings trained alone: they name {joined} exactly on {before} of {n_together} photos "
            f"together, {len(tries)} trainings together on {max(tries)} at most"
        )
        return
    for name, vector in zip(names, result.vector, strict=True):
        info = {k: v for k, v in entries[name].items() if k not in ("width", "saved", "together")}
        together_info = {
            "with": [n for n in names if n != name],
            "steps": steps,
            "seed": best_seed,
            "photos": len(images),
            "final_loss": round(result.losses[-1], 4),
        }
        library.save_embedding(name, vlm.model_id, vector, **info, together=together_info)
    hold(dict(zip(names, result.vector, strict=True)))
    print(
        f"trained {joined} together for {vlm.model_id} ({steps} steps, {len(images)} photos): named exactly on "
        f"{best} of {n_together} photos together (trained alone: {before})"
    )


def named_together(vlm: PersonalizedVLM, photos: list[Image.Image], present: list[tuple[str, ...]]) -> int:
    """On how many photos the caption names exactly the concepts the photo holds (and no other of the model's)."""
    captions = vlm.caption(photos, present)
    identifiers = {name: concept.identifier for name, concept in vlm.concepts.items()}
    return sum(
        {n for n, ident in identifiers.items() if word_pattern(ident).search(caption.text)} == set(holds)
        for caption, holds in zip(captions, present, strict=True)
    )


def resume_point(library: ConceptLibrary, concept: Concept, vlm: PersonalizedVLM, task: str, steps: int):
    """The steps done and the vector of an interrupted training of `concept` for this model."""
    entry = concept.embeddings.get(vlm.model_id)
    if entry is None or entry.get("complete", True):
        state = "no interrupted training" if entry is None else f"a finished embedding ({entry.get('steps')} steps)"
        raise MyVLMError(f"concept '{concept.name}' has {state} for {vlm.model_id}; train without --resume")
    if entry.get("task") != task:
        raise MyVLMError(f"concept '{concept.name}': the interrupted training was for --task {entry.get('task')}")
    done = int(entry.get("steps", 0))
    if done >= steps:
        raise MyVLMError(f"concept '{concept.name}': {done} steps are already done; ask for more with --steps")
    return done, library.load_embedding(concept.name, vlm.model_id, vlm.concept_width)
