"""`myvlm bench`: the published evaluation protocols (MyVLM, Yo'LLaVA) on a dataset folder, in one command.

Users of the peer projects ask most for numbers they can compare with the papers' tables. This module reads either
released dataset layout, trains each concept on its training photos, and measures per concept:

* captioning recall / precision / F1 of the identifier as a whole word (`myvlm.text.naming_metrics`): recall over the
  concept's test photos, precision over every caption that names it (its photos and the negatives);
* recognition accuracy (Yo'LLaVA): "Is <identifier> in this photo? Answer yes or no." on positives (right: yes) and
  negatives (right: no), and their mean, the weighted accuracy;
* VQA accuracy on the dataset's questions about the concept (multiple choice: the chosen letter or option text);
* similarity: all-MiniLM-L6-v2 cosine of personalized captions (identifier -> class word) to the base model's;
* seconds per concept (training and evaluation).

Layouts (found by `read_dataset`):

* MyVLM: one folder per concept with its photos and `captions.json` (file -> captions). The first `n_train` photos
  listed train, the rest are test positives; a `positives/` subfolder, where present, holds the test positives
  instead (all listed photos train). Negatives: `negatives/`, the concept's `hard_negatives/`, and the other
  concepts' test positives. `concepts.json` (optional) gives class words.
* Yo'LLaVA: `train/<concept>/` (photos; `captions.json` optional, else "A photo of <concept>.") and
  `test/<concept>/`; a concept's negatives are the other concepts' test photos; `yollava-visual-qa.json` holds the
  multiple-choice questions.

The concept enters every test photo (`gate="always"`: the embedding must tell its own photos apart, as in
Yo'LLaVA) or only its positives (`gate="oracle"`: what perfect concept heads give, as MyVLM's captions assume).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from myvlm.backends import VQA
from myvlm.errors import MyVLMError
from myvlm.images import IMAGE_EXTENSIONS, load_image
from myvlm.personalize import CAPTION_FILES, read_captions, vqa_examples
from myvlm.text import naming_metrics, word_pattern
from myvlm.training import Example, TrainingConfig, learn_concept

RESERVED = {"negatives", "together", "two_concepts", "positives", "hard_negatives"}
QA_FILES = ("yollava-visual-qa.json", "visual-qa.json", "vqa.json")
RECOGNITION_QUESTION = "Is {identifier} in this photo? Answer yes or no."
N_TRAIN = 4


@dataclass
class Question:
    image: Path
    question: str
    options: dict[str, str]
    answer: str  # the letter of the right option


@dataclass
class BenchConcept:
    """One concept's photos and questions as the dataset lays them out."""

    identifier: str
    class_word: str | None
    train: list[Path]
    captions: list[list[str]]
    positives: list[Path]
    negatives: list[Path] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)


@dataclass
class Dataset:
    root: Path
    layout: str
    concepts: list[BenchConcept]


def _photos(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _captions_file(folder: Path) -> Path | None:
    return next((folder / n for n in CAPTION_FILES if (folder / n).is_file()), None)


def _class_words(root: Path) -> dict[str, str]:
    index = root / "concepts.json"
    if not index.is_file():
        return {}
    try:
        rows = json.loads(index.read_text(encoding="utf-8")).get("concepts", [])
        return {r["identifier"]: r.get("class_word") or r.get("shape") for r in rows}
    except (ValueError, AttributeError, KeyError, TypeError):
        raise MyVLMError(f"{index}: expected {{'concepts': [{{'identifier', 'class_word'}}, ...]}}") from None


def read_dataset(root: str | Path, n_train: int = N_TRAIN) -> Dataset:
    """The concepts of a dataset folder in the MyVLM or the Yo'LLaVA layout (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise MyVLMError(f"{root}: no such dataset folder")
    words = _class_words(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        layout, concepts = "yollava", _read_yollava(root, words)
    else:
        layout, concepts = "myvlm", _read_myvlm(root, words, n_train)
    if not concepts:
        raise MyVLMError(
            f"{root}: no concepts found; expected concept folders with captions.json (MyVLM) or train/ and test/ "
            "folders (Yo'LLaVA)"
        )
    for concept in concepts:
        others = [p for c in concepts if c is not concept for p in c.positives]
        concept.negatives = concept.negatives + others
        if not concept.positives or not concept.negatives:
            raise MyVLMError(f"{root}: concept '{concept.identifier}' needs test photos and negatives to evaluate")
    _attach_questions(root, concepts)
    return Dataset(root, layout, concepts)


def _read_myvlm(root: Path, words: dict, n_train: int) -> list[BenchConcept]:
    concepts = []
    shared_negatives = _photos(root / "negatives")
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in RESERVED):
        captions_file = _captions_file(folder)
        if captions_file is None:
            continue
        captions = read_captions(captions_file)
        listed = [folder / name for name in captions if (folder / name).is_file()]
        if (folder / "positives").is_dir():
            train, positives = listed, _photos(folder / "positives")
        else:
            train, positives = listed[:n_train], listed[n_train:] + [p for p in _photos(folder) if p not in listed]
        concepts.append(
            BenchConcept(
                identifier=folder.name,
                class_word=words.get(folder.name),
                train=train,
                captions=[captions[p.name] for p in train],
                positives=positives,
                negatives=shared_negatives + _photos(folder / "hard_negatives"),
            )
        )
    return concepts


def _read_yollava(root: Path, words: dict) -> list[BenchConcept]:
    concepts = []
    for folder in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        train = _photos(folder)
        captions_file = _captions_file(folder)
        given = read_captions(captions_file) if captions_file else {}
        captions = [given.get(p.name, [f"A photo of {folder.name}."]) for p in train]
        concepts.append(
            BenchConcept(folder.name, words.get(folder.name), train, captions, _photos(root / "test" / folder.name))
        )
    return concepts


def _attach_questions(root: Path, concepts: list[BenchConcept]) -> None:
    """Multiple-choice questions in Yo'LLaVA's format: concept -> image path -> {question, options, correct_answer}."""
    path = next((root / n for n in QA_FILES if (root / n).is_file()), None)
    if path is None:
        return
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        by_identifier = {c.identifier: c for c in concepts}
        for identifier, entries in table.items():
            concept = by_identifier.get(identifier)
            if concept is None:
                continue
            for image, entry in entries.items():
                found = _find_image(root, image, identifier)
                if found is not None:
                    options = {str(k): str(v) for k, v in entry["options"].items()}
                    concept.questions.append(Question(found, entry["question"], options, str(entry["correct_answer"])))
    except (ValueError, AttributeError, KeyError, TypeError) as error:
        raise MyVLMError(f"{path}: not in Yo'LLaVA's visual-QA format ({type(error).__name__}: {error})") from None


def _find_image(root: Path, image: str, identifier: str) -> Path | None:
    """The image a question names: relative to the dataset (or its parent, as in the released file), else by name."""
    relative = Path(image)
    for candidate in (root / relative, root.parent / relative, root / "test" / identifier / relative.name):
        if candidate.is_file():
            return candidate
    return None


# --- running ----------------------------------------------------------------------------------------------------------
def _answers_yes(text: str) -> bool | None:
    """The first yes or no in an answer (None when it says neither)."""
    match = re.search(r"\b(yes|no)\b", text.lower())
    return None if match is None else match.group(1) == "yes"


def _chosen(text: str, question: Question) -> str | None:
    """The option an answer picks: a leading letter ("A", "B.", "(A)"), else the one option text it contains."""
    letters = "|".join(re.escape(k) for k in question.options)
    match = re.match(rf"\W*({letters})\b", text.strip())
    if match:
        return match.group(1)
    named = [k for k, v in question.options.items() if word_pattern(v.lower()).search(text.lower())]
    return named[0] if len(named) == 1 else None


def _ask_all(vlm, images, question: str, name: str, max_new_tokens: int, batch_size: int) -> list[str]:
    """The answers to one question about each image, with concept `name` inserted in every image, batched."""
    prompt = vlm.backend.prompt(VQA, question=question)
    per_image = [[name]] * len(images)
    return [c.text for c in vlm._run(images, lambda ids: prompt, per_image, batch_size, max_new_tokens, False)]


def _multiple_choice(question: Question) -> str:
    options = " ".join(f"{letter}. {text}" for letter, text in question.options.items())
    return f"{question.question} {options} Answer with the option's letter."


def bench_concept(
    vlm,
    concept: BenchConcept,
    config: TrainingConfig,
    *,
    gate: str = "always",
    max_images: int | None = None,
    batch_size: int = 8,
    similarity: bool = True,
) -> dict:
    """Train one concept on its training photos and measure it (module docstring); returns one row of the table."""
    from myvlm.evaluate import text_similarity

    start = time.perf_counter()
    name, identifier = concept.identifier, concept.identifier
    train = [load_image(p) for p in concept.train]
    examples = [Example(i, tuple(c)) for i, c in enumerate(concept.captions)]
    for example in examples:
        if not any(word_pattern(identifier).search(a) for a in example.answers):
            raise MyVLMError(f"concept '{name}': caption '{example.answers[0]}' does not name '{identifier}'")
    if config.task == VQA:
        described = SimpleNamespace(identifier=identifier, class_word=concept.class_word)
        examples += vqa_examples(vlm, described, train)
    result = learn_concept(vlm, name, identifier, train, examples, config, progress=False)
    trained_s = time.perf_counter() - start

    positives = [load_image(p) for p in concept.positives[:max_images]]
    negatives = [load_image(p) for p in concept.negatives[:max_images]]
    images = positives + negatives
    is_positive = [i < len(positives) for i in range(len(images))]
    inserted = [[name] if gate == "always" or pos else [] for pos in is_positive]
    base = [c.text for c in vlm.caption(images, [[] for _ in images], batch_size=batch_size)]
    personal = [c.text for c in vlm.caption(images, inserted, batch_size=batch_size)]
    naming = naming_metrics(personal, identifier, is_positive)

    question = RECOGNITION_QUESTION.format(identifier=identifier)
    said = [_answers_yes(t) for t in _ask_all(vlm, images, question, name, 5, batch_size)]
    positive_acc = sum(s is True for s in said[: len(positives)]) / len(positives)
    negative_acc = sum(s is False for s in said[len(positives) :]) / len(negatives)

    row = {
        "concept": name,
        "train_photos": len(train),
        "positives": len(positives),
        "negatives": len(negatives),
        "recall": round(naming.recall, 4),
        "precision": round(naming.precision, 4),
        "f1": round(naming.f1, 4),
        "recognition_positive": round(positive_acc, 4),
        "recognition_negative": round(negative_acc, 4),
        "recognition_weighted": round((positive_acc + negative_acc) / 2, 4),
        "vqa_accuracy": None,
        "vqa_questions": len(concept.questions),
        "similarity": None,
        "final_loss": round(result.losses[-1], 4) if result.losses else None,
        "train_seconds": round(trained_s, 2),
    }
    questions = concept.questions[:max_images]
    if questions:
        answers = [
            vlm.ask(load_image(q.image), _multiple_choice(q), concepts=[name], max_new_tokens=10).text
            for q in questions
        ]
        right = sum(_chosen(a, q) == q.answer for a, q in zip(answers, questions, strict=True))
        row["vqa_accuracy"] = round(right / len(questions), 4)
    if similarity:
        generic = [word_pattern(identifier).sub(concept.class_word or "it", p) for p in personal[: len(positives)]]
        scores = text_similarity(generic, base[: len(positives)])
        row["similarity"] = round(sum(scores) / len(scores), 4)
    row["seconds"] = round(time.perf_counter() - start, 2)
    vlm.remove_concept(name)
    return row


METRICS = (
    "recall",
    "precision",
    "f1",
    "recognition_positive",
    "recognition_negative",
    "recognition_weighted",
    "vqa_accuracy",
    "similarity",
    "seconds",
)


def overall(rows: Sequence[dict]) -> dict:
    """The mean of each metric over the concepts that have it (as the papers average over concepts)."""
    out = {}
    for metric in METRICS:
        values = [r[metric] for r in rows if r.get(metric) is not None]
        out[metric] = round(sum(values) / len(values), 4) if values else None
    return out


def markdown_table(rows: Sequence[dict], summary: dict) -> str:
    """The table as Markdown: one row per concept and the mean."""
    header = ["concept", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(value) -> str:
        return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    for row in [*rows, {"concept": "**mean**", **summary}]:
        lines.append("| " + " | ".join(cell(row.get(key)) for key in header) + " |")
    return "\n".join(lines) + "\n"


def run_bench(
    vlm, dataset: Dataset, config: TrainingConfig, *, gate: str = "always", max_images: int | None = None, **kwargs
) -> dict:
    """Every concept of the dataset, trained and measured one after the other; the table and its mean."""
    if gate not in ("always", "oracle"):
        raise MyVLMError(f"gate must be always or oracle, not {gate!r}")
    rows = [bench_concept(vlm, c, config, gate=gate, max_images=max_images, **kwargs) for c in dataset.concepts]
    return {
        "model": vlm.model_id,
        "dataset": as_dict(dataset),
        "task": config.task,
        "steps": config.steps,
        "seed": config.seed,
        "gate": gate,
        "max_images": max_images,
        "concepts": rows,
        "overall": overall(rows),
    }


def as_dict(dataset: Dataset) -> dict:
    """What was read, for the JSON output (paths as strings)."""
    return {
        "root": str(dataset.root),
        "layout": dataset.layout,
        "concepts": [
            {k: v for k, v in asdict(c).items() if k in ("identifier", "class_word")}
            | {"train": len(c.train), "positives": len(c.positives), "negatives": len(c.negatives)}
            for c in dataset.concepts
        ],
    }
