"""Learning concept embeddings: the MyVLM recipe as one loop you can read top to bottom.

One vector per concept, AdamW (lr 1.0, weight decay 1e-4), gradient-norm clip 0.05, 100 steps of batch 4. Each step
draws a batch (`Sampler`: examples, one answer each, a fresh augmented view of each image), and `train_step`
minimizes cross-entropy plus the attention regularizer λ·mean(p²) that keeps the concept token from dominating.
`descend` repeats steps from given starting vectors; `learn_concept` wraps it in a best-of-starts choice.

One addition to the official recipe: Adam at lr 1.0 moves every coordinate by about 1 in its first step, so the
first batches, not the start, decide where the vector goes, and a start can land on a plateau it never leaves.
So where the backend asks for it (BLIP-2, whose prompt does not hold the identifier), several starts each take
`probe_steps` steps and the one with the lowest loss goes on for the remaining steps; ``starts=1`` is the official
loop. Measurements are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from myvlm.augment import augment
from myvlm.backends import CAPTION, TASKS, VQA, Batch
from myvlm.errors import MyVLMError

if TYPE_CHECKING:
    from myvlm.model import PersonalizedVLM


def _whole(value, at_least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


def _number(value, *, positive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


@dataclass
class TrainingConfig:
    """The recipe for learning a concept embedding (the official MyVLM settings by default).

    Args:
        task: "caption" or "vqa": which λ of the attention regularizer applies (LLaVA weighs VQA far more).
        steps: optimizer steps of the kept trajectory (whole number ≥ 1).
        batch_size: examples per step (≥ 1); an image may appear more than once in a batch with few images.
        lr: AdamW learning rate (> 0); 1.0 as in the official code, which suits a single L2-normalized vector.
        weight_decay: AdamW weight decay (≥ 0).
        max_grad_norm: the gradient norm is clipped to this (> 0) before each step.
        reg_lambda: λ of the attention regularizer (≥ 0); None takes the backend's value for `task`.
        augment: train on augmented views of the images (crops, flips, colour jitter) rather than the originals.
        seed: seeds the starting vector, the examples drawn and the views (any integer).
        starts: starting vectors probed before training goes on from the best (≥ 1); None takes the backend's
            (BLIP-2 3, LLaVA 1). Only used when `steps` > `probe_steps` and no starting vector is given.
        probe_steps: steps each probed start takes before the best is chosen (≥ 1).
    """

    task: str = CAPTION
    steps: int = 100
    batch_size: int = 4
    lr: float = 1.0
    weight_decay: float = 1e-4
    max_grad_norm: float = 0.05
    reg_lambda: float | None = None
    augment: bool = True
    seed: int = 0
    starts: int | None = None
    probe_steps: int = 20

    def __post_init__(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        for name in ("steps", "batch_size", "probe_steps") + (() if self.starts is None else ("starts",)):
            if not _whole(getattr(self, name), 1):
                problems.append(f"{name} must be a whole number of at least 1, not {getattr(self, name)!r}")
        for name in ("lr", "max_grad_norm"):
            if not _number(getattr(self, name), positive=True):
                problems.append(f"{name} must be a finite number above 0, not {getattr(self, name)!r}")
        for name in ("weight_decay",) + (() if self.reg_lambda is None else ("reg_lambda",)):
            if not _number(getattr(self, name), positive=False):
                problems.append(f"{name} must be a finite number of at least 0, not {getattr(self, name)!r}")
        if not isinstance(self.augment, bool):
            problems.append(f"augment must be True or False, not {self.augment!r}")
        if not _whole(self.seed, -(2**63)):
            problems.append(f"seed must be a whole number, not {self.seed!r}")
        if problems:
            raise MyVLMError("; ".join(problems))


@dataclass(frozen=True)
class Example:
    """One training target: an image, the question (None for captioning) and the accepted answers."""

    image: int
    answers: tuple[str, ...]
    question: str | None = None


@dataclass
class TrainingResult:
    """The kept trajectory: its last vector (one row per concept when training several), loss per step, steps done
    (counting steps before a resumed start), and why it stopped early (None if every step ran)."""

    vector: torch.Tensor
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    stopped_early: str | None = None


@dataclass(frozen=True)
class StepReport:
    """What one finished step tells its observers: the loss and regularizer, and the vector(s) they were measured on."""

    step: int
    loss: float
    regularizer: float
    measured: torch.Tensor


def initial_vector(width: int, seed: int) -> torch.Tensor:
    """Official initialization: uniform [0, 1) then L2-normalized."""
    generator = torch.Generator().manual_seed(seed)
    vector = torch.rand(width, generator=generator)
    return vector / vector.norm()


# 4 views per image: 100 steps of batch 4 over 4 images see each view ~25 times. Each view costs one frozen forward
# pass (LLaVA: the whole prefix), so the pool is most of the cached loop's work (benchmarks/RESULTS.md).
VIEWS_PER_IMAGE = 4
# Seeds of the probed starts: seed, seed + PROBE_SEED_STRIDE, ...
PROBE_SEED_STRIDE = 1_000_003


def streams(seed: int, views: np.random.Generator | None = None) -> tuple[np.random.Generator, np.random.Generator]:
    """(examples stream, views stream) of one descent. Examples and their answers come from default_rng(seed);
    views from `views` where given (a single loop continues the stream its view pool was drawn from), else from
    default_rng([seed, 2]). Two streams: the cached and the uncached loop then draw the same examples."""
    return np.random.default_rng(seed), views if views is not None else np.random.default_rng([seed, 2])


@dataclass
class Sampler:
    """Draws training batches: examples without replacement (reshuffled when used up), one of each example's answers,
    and one view of each image (the pool's, or a fresh augmentation)."""

    vlm: PersonalizedVLM
    images: Sequence[Image.Image]
    examples: Sequence[Example]
    concepts_in: Callable[[Example], tuple[str, ...]]  # the concepts an example's image holds
    pool: list | None  # per image, its cached views (None: the official uncached loop)
    config: TrainingConfig
    rng: np.random.Generator
    view_rng: np.random.Generator
    order: list[int] = field(default_factory=list)

    def draw(self) -> tuple[Batch, list[list[str]], list | None]:
        """(batch, the concepts each sample inserts, the cached view of each sample or None)."""
        backend, concepts = self.vlm.backend, self.vlm.concepts
        picked = []
        while len(picked) < self.config.batch_size:
            if not self.order:
                self.order = list(self.rng.permutation(len(self.examples)))
            picked.append(self.examples[self.order.pop()])
        inserted = [sorted(self.concepts_in(example)) for example in picked]
        prompts, targets = [], []
        for example, names in zip(picked, inserted, strict=True):
            targets.append(example.answers[int(self.rng.integers(len(example.answers)))])
            if example.question is None:
                prompts.append(backend.prompt(CAPTION, [concepts[n].identifier for n in names]))
            else:
                prompts.append(backend.prompt(VQA, question=example.question))
        counts = [len(names) for names in inserted]
        originals = [self.images[e.image] for e in picked]
        if self.pool is None:
            views = [augment(image, self.view_rng) for image in originals] if self.config.augment else originals
            return backend.encode(views, prompts, counts, targets), inserted, None
        cached = [self.pool[e.image][int(self.view_rng.integers(len(self.pool[e.image])))] for e in picked]
        # Token ids depend only on the image size: the original images stand in for the views, without pixels.
        return backend.encode(originals, prompts, counts, targets, False), inserted, cached


def train_step(
    vlm: PersonalizedVLM, sample: tuple[Batch, list[list[str]], list | None], config: TrainingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, regularizer) of one batch with the concepts inserted, cross-entropy + regularizer = loss."""
    batch, inserted, cached = sample
    backend = vlm.backend
    with vlm.activate(inserted, record_attention=True, batch=batch):
        cross_entropy = backend.loss(batch) if cached is None else backend.cached_loss(batch, cached)
        regularizer = backend.regularizer(config.task, config.reg_lambda)
    return cross_entropy + regularizer, regularizer


def descend(
    vlm: PersonalizedVLM,
    names: Sequence[str],
    starts: torch.Tensor,
    steps: int,
    sampler: Sampler,
    config: TrainingConfig,
    *,
    first_step: int = 0,
    observers: Sequence[Callable[[StepReport], None]] = (),
) -> TrainingResult:
    """`steps` optimizer steps on the vectors of `names` from `starts` (one row per name); stops at the first
    non-finite loss or vector, keeping the last finite one. The result holds one vector for one name, else one row
    per name; each observer sees every finished step."""
    vectors = [vlm.concepts.set(name, row, trainable=True) for name, row in zip(names, starts, strict=True)]

    def kept() -> torch.Tensor:
        return vectors[0].detach().clone() if len(vectors) == 1 else torch.stack([v.detach() for v in vectors])

    optimizer = torch.optim.AdamW(vectors, lr=config.lr, weight_decay=config.weight_decay)
    result = TrainingResult(kept())
    for step in range(first_step, first_step + steps):
        loss, regularizer = train_step(vlm, sampler.draw(), config)
        if not math.isfinite(loss.item()):
            result.stopped_early = f"loss became {loss.item()} at step {step}; kept the last finite embedding"
            break
        measured = result.vector  # the vector this loss was measured on: no copy beyond the one kept anyway
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vectors, config.max_grad_norm)
        optimizer.step()
        if not all(torch.isfinite(v).all() for v in vectors):
            result.stopped_early = f"embedding became non-finite at step {step}; kept the last finite embedding"
            break
        result.vector = kept()
        result.losses.append(loss.item())
        result.steps_done = step + 1
        report = StepReport(step, loss.item(), regularizer.item(), measured)
        for observe in observers:
            observe(report)
    return result


def best_of_starts(
    vlm: PersonalizedVLM,
    name: str,
    seeds: Sequence[int],
    make_sampler: Callable[[np.random.Generator, np.random.Generator], Sampler],
    config: TrainingConfig,
    progress: Callable[[StepReport], None],
    observers: Sequence[Callable[[StepReport], None]],
) -> TrainingResult:
    """Each seed's start takes `probe_steps`; the one with the lowest mean loss over its last 10 steps goes on for the
    remaining steps (with the streams of the first seed + 1). The result is that one trajectory."""
    probes = [
        descend(
            vlm,
            [name],
            initial_vector(vlm.concept_width, s)[None],
            config.probe_steps,
            make_sampler(*streams(s)),
            config,
            observers=[progress],
        )
        for s in seeds
    ]
    finished = [p for p in probes if p.losses and p.stopped_early is None]
    best = min(finished or probes, key=lambda p: float(np.mean(p.losses[-10:])) if p.losses else math.inf)
    if not finished:
        return best
    rest = descend(
        vlm,
        [name],
        best.vector[None],
        config.steps - config.probe_steps,
        make_sampler(*streams(seeds[0] + 1)),
        config,
        first_step=config.probe_steps,
        observers=[progress, *observers],
    )
    return TrainingResult(rest.vector, best.losses + rest.losses, rest.steps_done, rest.stopped_early)


def learn_concept(
    vlm: PersonalizedVLM,
    name: str,
    identifier: str,
    images: Sequence[Image.Image],
    examples: Sequence[Example],
    config: TrainingConfig | None = None,
    *,
    views_per_image: int | None = VIEWS_PER_IMAGE,
    init: torch.Tensor | None = None,
    progress: bool = True,
    on_step: Callable[[int, float, torch.Tensor], None] | None = None,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> TrainingResult:
    """Train the embedding of concept `name` on `examples`; the VLM stays frozen. Returns the learned vector, which
    the model also holds from then on.

    With `views_per_image`, everything the vector cannot influence is computed once: each image gets a pool of
    augmented views encoded once (BLIP-2: vision encoder outputs; LLaVA: projected image tokens and the LLM's
    keys/values before the concept token), and each step runs only what depends on the vector. `None` runs the
    official loop: a fresh augmentation and a full forward and backward pass every step.

    `init` continues from a given vector (no probing of starts). `on_step(step, loss, vector)` sees each step of the
    trajectory that is kept, with the vector that loss was measured on; `on_progress(done, total, loss)` every step
    run, probes included (a progress bar elsewhere than the terminal; raising in it stops the training).
    """
    config = config or TrainingConfig()
    if not images or not examples:
        raise MyVLMError(f"concept '{name}': no training images or captions")
    for example in examples:
        if not any(identifier in answer for answer in example.answers) and example.question is None:
            raise MyVLMError(f"concept '{name}': caption '{example.answers[0]}' does not contain '{identifier}'")
    for text in (identifier, *(t for e in examples for t in (*e.answers, e.question or ""))):
        if token := vlm.backend.special_token_in(text):
            raise MyVLMError(f"concept '{name}': {text!r} holds the model's special token {token!r}; leave it out")
    view_rng = np.random.default_rng([config.seed, 1])
    pool = _view_pool(vlm.backend, images, views_per_image, config, view_rng)
    vlm.add_concept(name, identifier, torch.zeros(vlm.concept_width))
    starts = vlm.backend.training_starts if config.starts is None else config.starts
    probing = init is None and starts > 1 and config.steps > config.probe_steps
    total = config.steps + (starts - 1) * config.probe_steps if probing else config.steps
    observers = [] if on_step is None else [lambda r: on_step(r.step, r.loss, r.measured)]

    def make_sampler(rng, view_stream) -> Sampler:
        return Sampler(vlm, images, examples, lambda example: (name,), pool, config, rng, view_stream)

    with _ProgressBar(total, progress, f"learning {name}", on_progress) as bar:
        if probing:
            seeds = [config.seed + k * PROBE_SEED_STRIDE for k in range(starts)]
            result = best_of_starts(vlm, name, seeds, make_sampler, config, bar, observers)
        else:  # the official loop
            start = initial_vector(vlm.concept_width, config.seed) if init is None else init
            sampler = make_sampler(*streams(config.seed, view_rng))
            result = descend(vlm, [name], start[None], config.steps, sampler, config, observers=[bar, *observers])
    vlm.concepts.set(name, result.vector)
    return result


def learn_together(
    vlm: PersonalizedVLM,
    names: Sequence[str],
    images: Sequence[Image.Image],
    examples: Sequence[Example],
    present: Sequence[Sequence[str]],
    config: TrainingConfig | None = None,
    *,
    views_per_image: int | None = VIEWS_PER_IMAGE,
    progress: bool = True,
) -> TrainingResult:
    """Fine-tune the embeddings of several concepts at once on photos that show them together (MC-LLaVA's joint
    training). Each concept starts from the vector the model holds (trained alone) and keeps its own; every example
    inserts the concepts its image holds (`present[image]`), so photos of one concept alone keep it nameable alone.

    Why: vectors learnt apart need not stay apart when inserted together: BLIP-2's Q-Former can mix two of them into
    what reads as a third name. The result's `vector` holds one row per name, in the order of `names`.
    """
    config = config or TrainingConfig()
    unknown = [n for n in names if n not in vlm.concepts]
    if unknown:
        raise MyVLMError(f"concept '{unknown[0]}' has no embedding for {vlm.model_id}; train it alone first")
    if len(set(names)) < 2:
        raise MyVLMError("training together needs at least two different concepts")
    if not images or not examples:
        raise MyVLMError("no training photos or captions to train the concepts together on")
    view_rng = np.random.default_rng([config.seed, 1])
    pool = _view_pool(vlm.backend, images, views_per_image, config, view_rng)
    starts = vlm.concepts.stack(list(names)).detach().float()
    sampler = Sampler(
        vlm,
        images,
        examples,
        lambda example: tuple(present[example.image]),
        pool,
        config,
        *streams(config.seed, view_rng),
    )
    with _ProgressBar(config.steps, progress, f"learning {' + '.join(names)} together") as bar:
        result = descend(vlm, names, starts, config.steps, sampler, config, observers=[bar])
    for name, vector in zip(names, result.vector, strict=True):
        vlm.concepts.set(name, vector)
    return result


def _view_pool(backend, images, views_per_image, config, view_rng) -> list | None:
    """Per image, `views_per_image` augmented views encoded once (None: the official uncached loop)."""
    if views_per_image is None:
        return None
    if views_per_image < 1:
        raise MyVLMError("views_per_image must be at least 1")
    count = views_per_image if config.augment else 1
    return [
        backend.cache_views([augment(image, view_rng) for _ in range(count)] if config.augment else [image])
        for image in images
    ]


class _ProgressBar:
    """A tqdm bar (on a terminal only) as a step observer, closed on leaving the `with` block."""

    def __init__(
        self, total: int, enabled: bool, description: str, on_progress: Callable[[int, int, float], None] | None = None
    ) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=None if enabled else True, desc=description, unit="step")
        self.total, self.done, self.on_progress = total, 0, on_progress

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def __call__(self, report: StepReport) -> None:
        self.bar.update()
        self.bar.set_postfix(loss=f"{report.loss:.3f}", reg=f"{report.regularizer:.4f}")
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.done, self.total, report.loss)


def caption_examples(captions: Sequence[Sequence[str]]) -> list[Example]:
    """One captioning example per image from its list of captions."""
    return [Example(i, tuple(c)) for i, c in enumerate(captions)]
