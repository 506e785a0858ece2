"""`myvlm check MODEL`: a self-test for someone who has just downloaded real weights.

Before spending an hour on a concept, a user wants to know that this model, on this machine, in this dtype, does
what MyVLM needs: the hooks fire, a photo with no concept runs the untouched model bit for bit, the attention
regularizer is finite, a few cached training steps lower the loss, and captioning runs with and without a concept.
Each check is one `CheckResult`; the run also measures seconds per training step and peak memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from myvlm.backends import CAPTION
from myvlm.training import Example, TrainingConfig, initial_vector, learn_concept

IDENTIFIER = "Bobby"


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


@dataclass
class CheckReport:
    model: str
    family: str
    device: str
    dtype: str
    checks: list[CheckResult] = field(default_factory=list)
    seconds_per_step: float | None = None
    caption_plain: str | None = None
    caption_with_concept: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def generated_photos(n: int = 4) -> tuple[list, list[list[str]]]:
    """Photos of one toy-world concept with captions naming it `Bobby` (no download, the same on every machine)."""
    from myvlm.toyworld import concept_data

    data = concept_data(n_concepts=1, seed=0, n_train=n, n_positives=0, n_negatives=0, n_hard_negatives=0)[0]
    old = data.concept.identifier
    return [e.image for e in data.train], [[e.caption.replace(old, IDENTIFIER)] for e in data.train]


def _logits(vlm, batch) -> torch.Tensor:
    with torch.no_grad():
        return vlm.model(**vlm.backend.model_inputs(batch), use_cache=False).logits.float()


def run_check(vlm, steps: int = 10, max_new_tokens: int = 20) -> CheckReport:
    """Run every check on a loaded model; a failing check is recorded, never raised."""
    backend = vlm.backend
    report = CheckReport(vlm.model_id, vlm.family, str(backend.device), str(backend.dtype).removeprefix("torch."))
    add = report.checks.append
    images, captions = generated_photos()
    probe = "myvlm-check"
    other = "myvlm-check-other"
    vlm.add_concept(probe, IDENTIFIER, initial_vector(vlm.concept_width, 1))
    vlm.add_concept(other, IDENTIFIER, torch.randn(vlm.concept_width, generator=torch.Generator().manual_seed(2)))
    prompt = backend.prompt(CAPTION, [IDENTIFIER])
    plain_batch = backend.encode(images[:1], [backend.prompt(CAPTION)], [0], [captions[0][0]])
    concept_batch = backend.encode(images[:1], [prompt], [1], [captions[0][0]])

    # 1. Gating: with no concept, the hooked model computes exactly what the model without hooks computes.
    without_hooks_ = _without_hooks(vlm, plain_batch)
    with vlm.activate([[]], batch=plain_batch):
        gated = _logits(vlm, plain_batch)
    plain = _logits(vlm, plain_batch)
    same = torch.equal(gated, without_hooks_) and torch.equal(plain, without_hooks_)
    add(CheckResult("gating", same, "no concept: bit-identical to the model without hooks" if same else "differs"))

    # 2. Hooks fire: two different concept vectors give different outputs, and attention is recorded.
    outputs = []
    for name in (probe, other):
        with vlm.activate([[name]], record_attention=True, batch=concept_batch) as injection:
            outputs.append(_logits(vlm, concept_batch))
            terms = len(injection.attention_terms)
            if name == probe:
                regularizer = backend.regularizer(CAPTION) if terms else torch.tensor(float("nan"))
    fired = terms > 0 and not torch.equal(*outputs)
    add(CheckResult("hooks fire", fired, f"the concept changes the output; {terms} attention layers recorded"))
    value = float(regularizer)
    add(CheckResult("regularizer finite", math.isfinite(value), f"λ·Σ mean(p²) = {value:.3g}"))

    # 3. Cached training lowers the loss on the training photos (originals, all at once: no sampling noise).
    config = TrainingConfig(steps=steps, starts=1, seed=0)
    examples = [Example(i, tuple(c)) for i, c in enumerate(captions)]
    trained = "myvlm-check-trained"
    vlm.add_concept(trained, IDENTIFIER, initial_vector(vlm.concept_width, config.seed))
    everything = backend.encode(images, [prompt] * len(images), [1] * len(images), [c[0] for c in captions])
    before = _loss(vlm, trained, everything)
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = learn_concept(vlm, trained, IDENTIFIER, images, examples, config, progress=False)
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    report.seconds_per_step = round((time.perf_counter() - start) / max(len(result.losses), 1), 4)
    after = _loss(vlm, trained, everything)
    lowered = len(result.losses) == steps and math.isfinite(after) and after < before
    add(
        CheckResult(
            "training lowers the loss", lowered, f"{len(result.losses)} steps, loss {before:.4f} -> {after:.4f}"
        )
    )
    vector = vlm.concepts[trained].vector
    add(CheckResult("concept vector float32", vector.dtype == torch.float32, f"kept in {vector.dtype}"))

    # 4. Captioning runs with and without a (random) concept.
    try:
        plain_text = vlm.caption(images[:1], [[]], max_new_tokens=max_new_tokens)[0].text
        concept_text = vlm.caption(images[:1], [[probe]], max_new_tokens=max_new_tokens)[0].text
        report.caption_plain, report.caption_with_concept = plain_text, concept_text
        add(CheckResult("captioning", True, "runs with and without a concept"))
    except Exception as error:  # a self-test reports every failure instead of stopping at the first
        add(CheckResult("captioning", False, f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"))
    for name in (probe, other, trained):
        vlm.remove_concept(name)
    return report


def _loss(vlm, name: str, batch) -> float:
    """Cross-entropy of the batch's targets with concept `name` in every image."""
    with torch.no_grad(), vlm.activate([[name]] * len(batch.prompt_lengths), batch=batch):
        return float(vlm.backend.loss(batch))


def _without_hooks(vlm, batch) -> torch.Tensor:
    """Logits of the model with myvlm's hooks removed (then registered again)."""
    vlm.backend.remove_hooks()
    try:
        return _logits(vlm, batch)
    finally:
        vlm.backend._register_hooks()
