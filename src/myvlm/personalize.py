"""From a folder of photos to a trained concept: captions (given or written by the base model), VQA augmentation,
training, and storing the embedding in the library. Functions here return results and raise `MyVLMError`s that name
their parameters; `myvlm.cli` turns them into messages about its flags."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from myvlm.errors import MyVLMError
from myvlm.images import IMAGE_EXTENSIONS, load_image
from myvlm.library import Concept, ConceptLibrary, EmbeddingEntry
from myvlm.model import PersonalizedVLM, load
from myvlm.text import name_class_word, with_identifier, word_pattern
from myvlm.training import Example, TrainingConfig, learn_concept, learn_together

CAPTION_FILES = ("captions.json", "captions_augmented.json")
# Joint trainings tried (seeds seed, seed + 1, ...) until one names the concepts on every photo together; the best is
# kept: single runs spread widely (benchmarks/RESULTS.md).
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
        raise MyVLMError("no training photos: give the photos, or a concept folder's captions.json")
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
            raise MissingClassWord(f"concept '{concept.name}' has no class word; give captions or set its class word")
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


@dataclass(frozen=True)
class ConceptTraining:
    """A stored training of one concept: steps done in all (a resumed training counts the earlier ones), the last
    loss, and why it stopped early (None if every step ran)."""

    name: str
    model_id: str
    steps: int
    final_loss: float
    stopped_early: str | None = None


class MissingClassWord(MyVLMError):
    """Training from photos without captions needs the class word, to put the identifier where the base caption
    says it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the best vector so far was stored as an interrupted (resumable) entry."""

    def __init__(self, name: str, step: int, loss: float) -> None:
        super().__init__(f"kept the best embedding of '{name}' (step {step}, loss {loss:.3f})")
        self.name, self.step, self.loss = name, step, loss


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
    load_options: dict | None = None,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> ConceptTraining:
    """Train and store the concept's embedding. The best vector so far is saved as an incomplete entry every
    CHECKPOINT_EVERY steps and on Ctrl-C; `resume` continues from it (with a fresh optimizer) up to `steps`.
    `on_progress(done, total, loss)` hears of every step; a KeyboardInterrupt raised in it cancels as Ctrl-C does."""
    concept = library.get(name)
    TrainingConfig(task=task, steps=steps, seed=seed)  # check the settings before loading anything
    paths, caption_map = training_photos(images, captions)
    photos = [load_image(p) for p in paths]
    vlm = vlm or load(model, **(load_options or {}))  # load_options: myvlm.load's
    done, init = 0, None
    if resume:
        done, init = resume_point(library, concept, vlm, task, steps)
    examples = build_examples(vlm, concept, photos, [p.name for p in paths], caption_map, task)
    entry = EmbeddingEntry(family=vlm.family, task=task, seed=seed, source="myvlm")
    best = {"loss": float("inf"), "vector": None, "steps": done}

    def save_best() -> None:
        if best["vector"] is not None:
            checkpoint = EmbeddingEntry(
                **{**vars(entry), "steps": best["steps"], "final_loss": round(best["loss"], 4), "complete": False}
            )
            library.save_embedding(concept.name, vlm.model_id, best["vector"], checkpoint)

    def keep_best(step: int, loss: float, vector) -> None:
        if loss < best["loss"]:
            best.update(loss=loss, vector=vector, steps=done + step)
        if (step + 1) % CHECKPOINT_EVERY == 0:
            save_best()

    config = TrainingConfig(task=task, steps=steps - done, seed=seed)
    try:
        result = learn_concept(
            vlm,
            concept.name,
            concept.identifier,
            photos,
            examples,
            config,
            init=init,
            on_step=keep_best,
            on_progress=on_progress,
        )
    except KeyboardInterrupt:
        save_best()
        if best["vector"] is None:
            raise
        raise TrainingInterrupted(concept.name, best["steps"], best["loss"]) from None
    if result.steps_done == 0:
        raise MyVLMError(f"training of '{concept.name}' failed at the first step ({result.stopped_early})")
    total = done + result.steps_done
    final = EmbeddingEntry(
        **{**vars(entry), "steps": total, "final_loss": round(result.losses[-1], 4), "complete": True},
    )
    final.stopped_early = result.stopped_early
    vlm.embeddings.save(library, concept.name, vlm.model_id, entry=final)  # the vector just learned
    return ConceptTraining(concept.name, vlm.model_id, total, result.losses[-1], result.stopped_early)


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


@dataclass(frozen=True)
class TogetherTraining:
    """The outcome of training concepts together: on how many of the photos together the captions named exactly the
    concepts each holds, with the vectors trained alone (`before`) and after each try (-1: a try that stopped early);
    `stored` says whether the new vectors were better and replaced the ones trained alone."""

    names: tuple[str, ...]
    model_id: str
    steps: int
    photos: int
    photos_together: int
    before: int
    tries: list[int] = field(default_factory=list)
    stored: bool = False

    @property
    def best(self) -> int:
        return max([self.before, *self.tries])


def train_together(
    library: ConceptLibrary,
    names: Sequence[str],
    model: str,
    *,
    captions: Sequence[str],
    steps: int = 100,
    seed: int = 0,
    vlm: PersonalizedVLM | None = None,
    load_options: dict | None = None,
) -> TogetherTraining:
    """Fine-tune the embeddings of concepts already trained alone on photos that show them together (plus, best,
    their own photos), so that one caption names them all. The new embeddings are stored only if every step ran and
    they name the concepts on more of the photos together than the embeddings trained alone (a model that reads the
    identifiers from its prompt may already name them all, and training together could only lose that)."""
    if len(set(names)) != len(names):
        raise MyVLMError("each concept may be named once")
    concepts = [library.get(name) for name in names]
    TrainingConfig(steps=steps, seed=seed)  # check the settings before loading anything
    images, examples, present = together_photos(captions, concepts)
    vlm = vlm or load(model, **(load_options or {}))  # load_options: myvlm.load's
    entries = {}
    for concept in concepts:
        entry = concept.embedding(vlm.model_id)
        if entry is None or not entry.complete:
            state = "no embedding" if entry is None else "an interrupted training"
            raise MyVLMError(f"concept '{concept.name}' has {state} for {vlm.model_id}; train it alone first")
        entries[concept.name] = entry
        vlm.embeddings.load(library, concept.name, vlm.model_id)
    alone = vlm.embeddings.snapshot(names)
    together = [i for i, holds in enumerate(present) if len(holds) > 1]
    photos_together, holds_together = [images[i] for i in together], [present[i] for i in together]
    before = best = named_together(vlm, photos_together, holds_together)
    outcome = TogetherTraining(tuple(names), vlm.model_id, steps, len(images), len(together), before)
    if before == len(together):
        return outcome
    result = None
    for attempt in range(TOGETHER_ATTEMPTS):
        vlm.embeddings.restore(alone)
        config = TrainingConfig(steps=steps, seed=seed + attempt)
        trial = learn_together(vlm, list(names), images, examples, present, config)
        outcome.tries.append(named_together(vlm, photos_together, holds_together) if trial.steps_done == steps else -1)
        if outcome.tries[-1] > best:
            best, result, best_seed = outcome.tries[-1], trial, seed + attempt
        if best == len(together):
            break
    if result is None:
        vlm.embeddings.restore(alone)
        return outcome
    vlm.embeddings.restore(dict(zip(names, result.vector, strict=True)))
    for name in names:
        entry = EmbeddingEntry(**{**vars(entries[name]), "width": None, "saved": None})
        entry.together = {
            "with": [n for n in names if n != name],
            "steps": steps,
            "seed": best_seed,
            "photos": len(images),
            "final_loss": round(result.losses[-1], 4),
        }
        vlm.embeddings.save(library, name, vlm.model_id, entry=entry)
    return TogetherTraining(**{**vars(outcome), "stored": True})


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
    entry = concept.embedding(vlm.model_id)
    if entry is None or entry.complete:
        state = "no interrupted training" if entry is None else f"a finished embedding ({entry.steps} steps)"
        raise MyVLMError(f"concept '{concept.name}' has {state} for {vlm.model_id}; train it without resuming")
    if entry.task != task:
        raise MyVLMError(f"concept '{concept.name}': the interrupted training was for task {entry.task}")
    done = int(entry.steps or 0)
    if done >= steps:
        raise MyVLMError(f"concept '{concept.name}': {done} steps are already done; ask for more steps")
    return done, library.load_embedding(concept.name, vlm.model_id, vlm.concept_width)
