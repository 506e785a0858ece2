"""`myvlm demo`: the whole method on an embedded toy world, measured against exact ground truth.

Pick a toyworld concept, take 4 photos of it, build its head (a linear probe on the toy world's CLIP, toy-llava's
vision tower), learn its embedding, then caption unseen photos of it, ordinary scenes and hard negatives (same shape
and colour, without the mark) with the base and the personalized model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from myvlm.errors import MyVLMError

SUMMARY = (
    "recall",
    "precision",
    "preservation",
    "head_recall",
    "head_precision",
    "base_attribute_accuracy",
    "personalized_attribute_accuracy",
    "seconds",
)


def scene_seed_negatives(concept, count: int, seed: int):
    """Head-training negatives from their own seed range: ordinary scenes and hard negatives, never evaluated."""
    from myvlm.toyworld import render_scene, sample_scene

    base = (1 << 43) + seed * 100_000
    plain = [render_scene(sample_scene(base + i)) for i in range(count)]
    hard = [render_scene(sample_scene(base + 50_000 + i, hard_negative_of=concept)) for i in range(count)]
    return plain + hard


def run_demo(
    model: str = "toy-llava",
    *,
    json_path: str | None = None,
    report_path: str | None = None,
    seed: int = 0,
    concept_index: int = 0,
    n_positives: int = 20,
    n_negatives: int = 20,
    n_hard_negatives: int = 20,
    steps: int = 100,
    out=sys.stdout,
    load_options: dict | None = None,
) -> dict:
    from myvlm.heads import ConceptDetector, ObjectHead
    from myvlm.model import load, resolve_encoder
    from myvlm.text import naming_metrics
    from myvlm.toyworld import HEAD_ENCODER, caption_attribute_accuracy, concept_data
    from myvlm.training import TrainingConfig, caption_examples, learn_concept

    started = time.perf_counter()
    say = lambda text: print(text, file=out, flush=True)  # noqa: E731
    vlm = load(model, **(load_options or {}))  # load_options: device, dtype, ... as myvlm.load takes them
    data = concept_data(
        n_concepts=concept_index + 1,
        seed=seed,
        n_positives=n_positives,
        n_negatives=n_negatives,
        n_hard_negatives=n_hard_negatives,
    )[concept_index]
    concept, identifier = data.concept, data.concept.identifier
    say(f"myvlm demo: {model}, concept '{identifier}' = a {concept.describe()}")
    say(f"1/4 head: linear probe on {HEAD_ENCODER} features from {len(data.train)} photos")
    encoder = resolve_encoder(HEAD_ENCODER, vlm)  # on toy-llava the head reuses the loaded tower
    train_images = [e.image for e in data.train]
    head = ObjectHead.train(train_images, scene_seed_negatives(concept, 60, seed), encoder=encoder, seed=seed)
    detector = ConceptDetector({identifier: head}, {HEAD_ENCODER: encoder})

    say(f"2/4 embedding: {steps} steps on {len(train_images)} photos")
    captions = [[e.caption] for e in data.train]
    result = learn_concept(
        vlm, identifier, identifier, train_images, caption_examples(captions), TrainingConfig(steps=steps, seed=seed)
    )
    if result.stopped_early:
        raise MyVLMError(f"training stopped early: {result.stopped_early}")

    say("3/4 captioning unseen photos with the base and the personalized model")
    positives, negatives = data.positives, data.negatives + data.hard_negatives
    examples = positives + negatives
    images = [e.image for e in examples]
    fired = [[d.concept for d in found] for found in detector.detect(images)]
    base = vlm.caption(images, [[] for _ in images], progress=True)
    personal = vlm.caption(images, fired, progress=True)

    say("4/4 scoring against the scene graphs")
    is_positive = [i < len(positives) for i in range(len(examples))]
    naming = naming_metrics([c.text for c in personal], identifier, is_positive)
    preserved = [b.text == p.text for b, p, pos in zip(base, personal, is_positive, strict=True) if not pos]
    head_hits = [bool(f) for f in fired]
    head_recall = sum(h for h, p in zip(head_hits, is_positive, strict=True) if p) / len(positives)
    head_precision = (
        sum(h and p for h, p in zip(head_hits, is_positive, strict=True)) / sum(head_hits) if any(head_hits) else 0.0
    )

    def attribute_accuracy(texts) -> float:
        """Attribute slots right against each scene graph; the identifier counts as naming the concept object."""
        correct = total = 0
        for text, example in zip(texts, examples, strict=True):
            index = next((i for i, o in enumerate(example.scene.objects) if o.concept == identifier), None)
            names = {} if index is None else {identifier: index}
            c, t = caption_attribute_accuracy(text, example.scene, names)
            correct, total = correct + c, total + t
        return correct / total

    base_attributes = attribute_accuracy([c.text for c in base])
    personal_attributes = attribute_accuracy([c.text for c in personal])
    metrics = {
        "model": model,
        "concept": identifier,
        "n_pos": len(positives),
        "n_neg": len(negatives),
        "recall": round(naming.recall, 4),
        "precision": round(naming.precision, 4),
        "preservation": round(sum(preserved) / len(preserved), 4),
        "head_recall": round(head_recall, 4),
        "head_precision": round(head_precision, 4),
        "base_attribute_accuracy": round(base_attributes, 4),
        "personalized_attribute_accuracy": round(personal_attributes, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    say("")
    for key in SUMMARY:
        say(f"  {key:<32} {metrics[key]}")
    say("")
    for index in [0, 1, len(positives), len(examples) - 1]:
        kind = "positive" if is_positive[index] else "negative"
        say(f"  [{kind}] base:         {base[index].text}")
        say(f"  {' ' * len(kind)}   personalized: {personal[index].text}")
    if json_path:
        from myvlm.storage import write_json_atomic

        write_json_atomic(Path(json_path), metrics)
    if report_path:
        from myvlm.report import write_report
        from myvlm.text import word_pattern

        rows = [
            (
                e.image,
                ("concept photo" if p else "negative") + (" · head fired" if f else ""),
                [b.text, c.text],
                word_pattern(identifier).search(c.text) is not None,
            )
            for e, p, f, b, c in zip(examples, is_positive, fired, base, personal, strict=True)
        ]
        write_report(
            report_path,
            f"myvlm demo — {identifier} on {model}",
            ["base caption", "personalized caption"],
            rows,
            metrics,
        )
        say(f"report: {report_path}")
    return metrics
