"""Learning one concept embedding: the MyVLM recipe as one loop you can read top to bottom.

One vector, AdamW (lr 1.0, weight decay 1e-4), gradient-norm clip 0.05, 100 steps of batch 4. Each step samples
examples, a fresh augmented view of each image, one caption per image with the identifier in it, and minimizes
cross-entropy plus the attention regularizer λ·mean(p²) that keeps the concept token from dominating.

One addition to the official recipe: Adam at lr 1.0 moves every coordinate by about 1 in its first step, so the
first batches, not the start, decide where the vector goes, and now and then it lands on a plateau it never leaves
(toy-blip2, whose prompt does not hold the identifier: 2 of 36 trainings never named the concept; see
benchmarks/RESULTS.md). So where the backend asks for it (BLIP-2), several starts each take 20 steps and the one with
the lowest loss goes on for the remaining steps; ``starts=1`` is the official loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from myvlm.augment import augment
from myvlm.backends import CAPTION, TASKS, VQA
from myvlm.errors import MyVLMError
from myvlm.model import PersonalizedVLM


@dataclass
class TrainingConfig:
    task: str = CAPTION
    steps: int = 100
    batch_size: int = 4
    lr: float = 1.0
    weight_decay: float = 1e-4
    max_grad_norm: float = 0.05
    reg_lambda: float | None = None  # None: the backend's λ for the task
    augment: bool = True
    seed: int = 0
    starts: int | None = None  # None: the backend's; the best start after probe_steps goes on (if steps > probe_steps)
    probe_steps: int = 20

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise MyVLMError(f"task must be one of {', '.join(TASKS)}, not '{self.task}'")
        if min(self.steps, self.batch_size, self.probe_steps, 1 if self.starts is None else self.starts) < 1:
            raise MyVLMError("steps, batch size, starts and probe steps must be at least 1")


@dataclass(frozen=True)
class Example:
    """One training target: an image, the question (None for captioning) and the accepted answers."""

    image: int
    answers: tuple[str, ...]
    question: str | None = None


@dataclass
class TrainingResult:
    vector: torch.Tensor
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    stopped_early: str | None = None


def word_pattern(word: str) -> re.Pattern:
    """`word` as a whole word: "Max" matches in "Max is" but not in "Maxine"."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def with_identifier(caption: str, name: str, identifier: str, *, person: bool = False) -> str:
    """Put the identifier where the caption names the concept (for people also the title-cased name)."""
    names = {name, name.title()} if person else {name}
    for word in sorted(names, key=len, reverse=True):
        if word != identifier:
            caption = word_pattern(word).sub(identifier, caption)
    return caption


def initial_vector(width: int, seed: int) -> torch.Tensor:
    """Official initialization: uniform [0, 1) then L2-normalized."""
    generator = torch.Generator().manual_seed(seed)
    vector = torch.rand(width, generator=generator)
    return vector / vector.norm()


# 4 views per image: 100 steps of batch 4 over 4 images see each view ~25 times. Each view costs one frozen forward
# pass (LLaVA: the whole prefix), so the pool is most of the cached loop's work: 8 views gave the same recall at 0.8x
# the speed (benchmarks/RESULTS.md).
VIEWS_PER_IMAGE = 4


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
) -> TrainingResult:
    """Train the embedding of concept `name` on `examples`; the VLM stays frozen. Returns the learned vector.

    With `views_per_image`, everything the vector cannot influence is computed once: each image gets a pool of
    augmented views encoded once (BLIP-2: vision encoder outputs; LLaVA: projected image tokens and the LLM's
    keys/values before the concept token), and each step runs only what depends on the vector. `None` runs the
    official loop: a fresh augmentation and a full forward and backward pass every step.

    `init` continues from a given vector (no probing of starts). `on_step(step, loss, vector)` sees each step of the
    trajectory that is kept, with the vector that loss was measured on.
    """
    config = config or TrainingConfig()
    if not images or not examples:
        raise MyVLMError(f"concept '{name}': no training images or captions")
    for example in examples:
        if not any(identifier in answer for answer in example.answers) and example.question is None:
            raise MyVLMError(f"concept '{name}': caption '{example.answers[0]}' does not contain '{identifier}'")
    backend = vlm.backend
    view_rng = np.random.default_rng([config.seed, 1])
    pool = _view_pool(backend, images, views_per_image, config, view_rng)
    vlm.add_concept(name, identifier, torch.zeros(vlm.concept_width))
    starts = backend.training_starts if config.starts is None else config.starts
    probing = init is None and starts > 1 and config.steps > config.probe_steps
    total = config.steps + (starts - 1) * config.probe_steps if probing else config.steps
    bar = _progress_bar(total, progress, f"learning {name}")
    run = _Run(vlm, (name,), images, examples, lambda example: (name,), pool, config, bar)

    def streams(seed: int):
        """Examples and answers come from one stream, views from another: both loops sample the same examples."""
        return np.random.default_rng(seed), np.random.default_rng([seed, 2])

    if not probing:  # the official loop
        start = initial_vector(vlm.concept_width, config.seed) if init is None else init
        result = run.descend(start[None], config.steps, (np.random.default_rng(config.seed), view_rng), report=on_step)
    else:
        seeds = [config.seed + k * 1_000_003 for k in range(starts)]
        probes = [
            run.descend(initial_vector(vlm.concept_width, s)[None], config.probe_steps, streams(s)) for s in seeds
        ]
        finished = [p for p in probes if p.losses and p.stopped_early is None]
        result = min(finished or probes, key=lambda p: float(np.mean(p.losses[-10:])) if p.losses else math.inf)
        if finished:
            rest_steps = config.steps - config.probe_steps
            rest = run.descend(result.vector[None], rest_steps, streams(seeds[0] + 1), config.probe_steps, on_step)
            result = TrainingResult(rest.vector, result.losses + rest.losses, rest.steps_done, rest.stopped_early)
    bar.close()
    vlm.concepts[name].vector = result.vector.to(backend.device)
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

    Why: vectors learnt apart need not stay apart when inserted together. BLIP-2's Q-Former mixes two of them into
    what reads as a third name (toy-blip2 named both of two concepts in 0.008 of scenes, benchmarks/RESULTS.md).
    The result's `vector` holds one row per name, in the order of `names`.
    """
    config = config or TrainingConfig()
    unknown = [n for n in names if n not in vlm.concepts]
    if unknown:
        raise MyVLMError(f"concept '{unknown[0]}' has no embedding for {vlm.model_id}; train it alone first")
    if len(set(names)) < 2:
        raise MyVLMError("training together needs at least two different concepts")
    if not images or not examples:
        raise MyVLMError("no training photos or captions to train the concepts together on")
    backend = vlm.backend
    view_rng = np.random.default_rng([config.seed, 1])
    pool = _view_pool(backend, images, views_per_image, config, view_rng)
    starts = torch.stack([vlm.concepts[n].vector.detach().float() for n in names])
    bar = _progress_bar(config.steps, progress, f"learning {' + '.join(names)} together")
    run = _Run(vlm, tuple(names), images, examples, lambda example: tuple(present[example.image]), pool, config, bar)
    result = run.descend(starts, config.steps, (np.random.default_rng(config.seed), view_rng))
    bar.close()
    for name, vector in zip(names, result.vector, strict=True):
        vlm.concepts[name].vector = vector.to(backend.device)
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


def _progress_bar(total: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=None if enabled else True, desc=description, unit="step")


@dataclass
class _Run:
    """What stays fixed while vectors descend: the model, whose vectors train, the data and the settings."""

    vlm: PersonalizedVLM
    names: tuple[str, ...]
    images: Sequence[Image.Image]
    examples: Sequence[Example]
    concepts_in: Callable[[Example], tuple[str, ...]]  # the concepts an example's image holds
    pool: list | None
    config: TrainingConfig
    bar: object

    def descend(self, starts: torch.Tensor, steps: int, rngs, first_step: int = 0, report=None) -> TrainingResult:
        """`steps` optimizer steps from `starts` (one row per name), drawing examples and views from `rngs`. The
        result holds one vector for one name, else one row per name."""
        vlm, config, examples = self.vlm, self.config, self.examples
        backend = vlm.backend
        rng, view_pick = rngs
        vectors = [torch.nn.Parameter(row.clone().float().to(backend.device)) for row in starts]
        for name, vector in zip(self.names, vectors, strict=True):
            vlm.concepts[name].vector = vector

        def kept() -> torch.Tensor:
            return vectors[0].detach().clone() if len(vectors) == 1 else torch.stack([v.detach() for v in vectors])

        optimizer = torch.optim.AdamW(vectors, lr=config.lr, weight_decay=config.weight_decay)
        result = TrainingResult(kept())
        order: list[int] = []
        for step in range(first_step, first_step + steps):
            picked = []
            while len(picked) < config.batch_size:
                if not order:
                    order = list(rng.permutation(len(examples)))
                picked.append(examples[order.pop()])
            inserted = [sorted(self.concepts_in(example)) for example in picked]
            prompts, targets = [], []
            for example, names in zip(picked, inserted, strict=True):
                targets.append(example.answers[int(rng.integers(len(example.answers)))])
                if example.question is None:
                    prompts.append(backend.prompt(CAPTION, [vlm.concepts[n].identifier for n in names]))
                else:
                    prompts.append(backend.prompt(VQA, question=example.question))
            counts = [len(names) for names in inserted]
            if self.pool is None:
                originals = [self.images[e.image] for e in picked]
                views = [augment(image, view_pick) for image in originals] if config.augment else originals
                batch = backend.encode(views, prompts, counts, targets)
            else:
                cached = [self.pool[e.image][int(view_pick.integers(len(self.pool[e.image])))] for e in picked]
                # Token ids depend only on the image size: the original images stand in for the views, without pixels.
                batch = backend.encode([self.images[e.image] for e in picked], prompts, counts, targets, False)
            with vlm.activate(inserted, record_attention=True) as injection:
                injection.batch = batch
                cross_entropy = backend.loss(batch) if self.pool is None else backend.cached_loss(batch, cached)
                regularizer = backend.regularizer(config.task, config.reg_lambda)
            loss = cross_entropy + regularizer
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
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss.item():.3f}", reg=f"{regularizer.item():.4f}")
            if report is not None:
                report(step, loss.item(), measured)
        return result


def caption_examples(captions: Sequence[Sequence[str]]) -> list[Example]:
    """One captioning example per image from its list of captions."""
    return [Example(i, tuple(c)) for i, c in enumerate(captions)]
