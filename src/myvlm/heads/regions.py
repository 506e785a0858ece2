"""Object heads over region features (one embedding per image patch, e.g. a VLM's own vision tower).

A whole-image embedding averages a small distinguishing mark away (dots on a toy, a logo on a mug), so a region
encoder's head is a linear probe scored at its best region: p = sigmoid(max_r (w · f_r) + b). It is trained with the
official recipe (AdamW, weight decay 0.01, cosine schedule, 500 steps, batches of 16 balanced between positives and
negatives, flipped views; lr 1e-2 rather than 1e-3, as the features are unit vectors) on the concept's photos and
shifted views of them against its negatives, and its bias is then calibrated to sit midway between the lowest
positive score and the highest negative score.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageOps

PROBE_STEPS = 500
PROBE_BATCH = 16
PROBE_LR = 1e-2
PROBE_WEIGHT_DECAY = 0.01
SHIFTS_PER_VIEW = 3
MAX_SHIFT = 0.15  # of the image side


def probe_views(image: Image.Image, rng: random.Random) -> list[Image.Image]:
    """The photo, its mirror image, and each shifted (wrapping around) so the concept is seen at other places: a
    vision tower's patch features carry their position, and 4 photos show only 4 of them."""
    views = [image, ImageOps.mirror(image)]
    limit = max(1, int(MAX_SHIFT * min(image.size)))
    shifted = [
        ImageChops.offset(view, rng.randint(-limit, limit), rng.randint(-limit, limit))
        for view in views
        for _ in range(SHIFTS_PER_VIEW)
    ]
    return views + shifted


def best_region_scores(features: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[N, D] photo or [N, R, D] region embeddings times [D] or [D, H] directions, best region per photo."""
    scores = features @ directions
    return scores.amax(1) if features.dim() == 3 else scores


def train_region_probe(
    positives: torch.Tensor, negatives: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(weight [D], bias [1], calibration) from [P, R, D] positive and [N, R, D] negative region features."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(positives.shape[-1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / PROBE_STEPS))
    )
    half = PROBE_BATCH // 2
    targets = torch.cat([torch.ones(half), torch.zeros(half)])
    for _ in range(PROBE_STEPS):
        pos = positives[torch.randint(len(positives), (half,), generator=generator)]
        neg = negatives[torch.randint(len(negatives), (half,), generator=generator)]
        logits = best_region_scores(torch.cat([pos, neg]), weight) + bias
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    weight, bias = weight.detach(), bias.detach()
    lowest_positive = float((best_region_scores(positives, weight) + bias).min())
    highest_negative = float((best_region_scores(negatives, weight) + bias).max())
    # Unseen photos of the concept score lower than the training views: move the boundary to the middle of the gap.
    shift = (lowest_positive + highest_negative) / 2 if lowest_positive > highest_negative else 0.0
    stats = {"lowest_positive_logit": lowest_positive - shift, "highest_negative_logit": highest_negative - shift}
    return weight, bias - shift, stats


def held_out_logits(photo_views: torch.Tensor, negatives: torch.Tensor, seed: int = 0) -> list[float]:
    """Each photo's logit under a probe trained without any of its views (`train_region_probe`'s recipe and
    calibration): how an unseen photo of the concept would score. From [P, V, R, D] region features of each photo's
    views, the photo itself first, and [N, R, D] negatives. The P probes train at once, one batched loop: the cost of
    one probe rather than P (a separate loop each took 10 s per photo on a busy 2-core machine)."""
    photos, views = photo_views.shape[:2]
    flat = photo_views.reshape(photos * views, *photo_views.shape[2:])
    allowed = torch.stack([torch.tensor([i for i in range(photos * views) if i // views != k]) for k in range(photos)])
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(photos, flat.shape[-1], requires_grad=True)
    bias = torch.zeros(photos, 1, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / PROBE_STEPS))
    )
    half = PROBE_BATCH // 2
    targets = torch.cat([torch.ones(half), torch.zeros(half)]).expand(photos, -1)

    def scores(features: torch.Tensor) -> torch.Tensor:  # [P, B, R, D] -> [P, B], each probe on its own rows
        return torch.einsum("pbrd,pd->pbr", features, weight).amax(-1) + bias

    for _ in range(PROBE_STEPS):
        pos = flat[allowed.gather(1, torch.randint(allowed.shape[1], (photos, half), generator=generator))]
        neg = negatives[torch.randint(len(negatives), (photos, half), generator=generator)]
        loss = F.binary_cross_entropy_with_logits(scores(torch.cat([pos, neg], 1)), targets, reduction="none")
        optimizer.zero_grad(set_to_none=True)
        loss.mean(1).sum().backward()  # each probe's own mean: the probes do not share a gradient
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        lowest_positive = scores(flat[allowed]).amin(1)
        highest_negative = scores(negatives.expand(photos, *negatives.shape)).amax(1)
        shift = torch.where(
            lowest_positive > highest_negative, (lowest_positive + highest_negative) / 2, torch.zeros(photos)
        )
        own = scores(photo_views[:, :1]).reshape(photos)
    return (own - shift).tolist()
