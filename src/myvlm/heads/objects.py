"""Object concepts: a linear scorer over image embeddings, calibrated per concept on its own photos.

Why a prototype direction and not a probe trained against negatives: with ~4 positives and generic negatives (the
only ones we can ship), a probe trained with the official recipe (AdamW, 500 steps, balanced batches) learns to
separate "any real photo" from synthetic negatives and fires on every dog for a dog concept (F1 0.52-0.82 on the
benchmark). The mean direction of many augmented views (tilted and cropped, recoloured, zoomed out), thresholded at
a leave-one-out calibrated cosine and applied to the best-matching region of a photo, is the linear layer that
generalizes (held-out-subject F1 0.956, rules fitted on other subjects); see benchmarks/RESULTS.md."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from myvlm.errors import MyVLMError
from myvlm.heads.encoders import DEFAULT_ENCODER, ImageEncoder, embed_regions, get_encoder
from myvlm.heads.regions import best_region_scores, held_out_logits, probe_views, train_region_probe

# Augmented views per positive photo, on top of the photo itself: the count benchmarks/heads.py measures (its
# default), split over the view families in the shares below. Each family covers a way a user's next photo may
# differ: the colour and zoom-out views removed most false positives, geometric ones on top of them recovered misses.
# 44 views measured no better than 11 under the held-out-subject protocol, at 4x the time (benchmarks/RESULTS.md).
VIEWS_PER_PHOTO = 11
VIEW_SHARES = {"geometric": 24, "colour": 12, "zoom_out": 8}
ROTATION_DEGREES = 30.0
MIN_CROP_SCALE = 0.6
# brightness, contrast and saturation factors of the colour views
COLOUR_JITTER = ((ImageEnhance.Brightness, 0.7, 1.3), (ImageEnhance.Contrast, 0.7, 1.3), (ImageEnhance.Color, 0.6, 1.4))
ZOOM_OUT_SCALES = (0.5, 0.8)
LOO_STD_FACTOR = 1.5  # accept new photos down to 1.5 standard deviations below how well held-out positives match
NEGATIVE_MARGIN = 0.02  # stay this far above the best-scoring negative
TEMPERATURE = 20.0  # logit = TEMPERATURE * (cosine - threshold): p = 0.5 at the threshold, 0.27/0.73 at ±0.05
GENERIC_NEGATIVES = 16
MIN_PHOTOS = 3  # fewer photos give no spread to calibrate the threshold on: the head is trained with a warning
DEFAULT_BAND = (0.0, 1.0)


def mean_colour(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0))


def tilted(image: Image.Image, rng: random.Random) -> Image.Image:
    """Mirrored half the time, rotated up to ±30° with the photo's mean colour filling the corners."""
    image = ImageOps.mirror(image) if rng.random() < 0.5 else image
    return image.rotate(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES), Image.BICUBIC, fillcolor=mean_colour(image))


def geometric_view(image: Image.Image, rng: random.Random) -> Image.Image:
    """Tilted and zoomed in on part of the object."""
    view = tilted(image, rng)
    scale = rng.uniform(MIN_CROP_SCALE, 1.0)
    width, height = int(view.width * scale), int(view.height * scale)
    left, top = rng.randint(0, view.width - width), rng.randint(0, view.height - height)
    return view.crop((left, top, left + width, top + height))


def colour_view(image: Image.Image, rng: random.Random) -> Image.Image:
    """Other light and camera: brightness, contrast and saturation changed, then tilted."""
    view = image
    for enhancer, low, high in COLOUR_JITTER:
        view = enhancer(view).enhance(rng.uniform(low, high))
    return tilted(view, rng)


def zoom_out_view(image: Image.Image, rng: random.Random) -> Image.Image:
    """The object smaller and elsewhere in the frame, over a blurred copy of its own scene."""
    scale = rng.uniform(*ZOOM_OUT_SCALES)
    background = image.filter(ImageFilter.GaussianBlur(max(image.size) / 25))
    small = image.resize((int(image.width * scale), int(image.height * scale)), Image.BICUBIC)
    background.paste(small, (rng.randint(0, image.width - small.width), rng.randint(0, image.height - small.height)))
    return background


VIEW_FAMILIES = {"geometric": geometric_view, "colour": colour_view, "zoom_out": zoom_out_view}


def view_counts(views: int = VIEWS_PER_PHOTO) -> dict[str, int]:
    """Views of each family for `views` in all, in the proportions of VIEW_SHARES (at least one of each)."""
    total = sum(VIEW_SHARES.values())
    return {family: max(1, round(share * views / total)) for family, share in VIEW_SHARES.items()}


def augmented_views(image: Image.Image, rng: random.Random, counts: dict[str, int] | None = None) -> list[Image.Image]:
    """Views a user's next photo of the object may show, `counts[family]` of each family (`view_counts()`)."""
    image = image.convert("RGB")
    counts = view_counts() if counts is None else counts
    return [VIEW_FAMILIES[family](image, rng) for family, count in counts.items() for _ in range(count)]


def photo_view_features(
    encoder: ImageEncoder, image: Image.Image, whole: torch.Tensor, views: int = VIEWS_PER_PHOTO, seed: int = 0
) -> torch.Tensor:
    """[1 + views, D]: the photo's own embedding `whole` ([1, D]), then those of its augmented views. The views are
    drawn from the photo's pixels and `seed` alone, so a photo gets the same views whatever photos it is enrolled
    with, in any order, and benchmarks/heads.py measures exactly the views `concept add` makes."""
    image = image.convert("RGB")
    rng = random.Random(f"{seed}:{image.size}:{hashlib.sha256(image.tobytes()).hexdigest()}")
    embed_views = getattr(encoder, "embed_views", encoder.embed)
    return torch.cat([whole, embed_views(augmented_views(image, rng, view_counts(views)))])


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def generic_negative_images(count: int = GENERIC_NEGATIVES, seed: int = 0, size: int = 224) -> list[Image.Image]:
    """Procedural scenes (natural-spectrum noise, shapes, stripes, blurred blobs): negatives for any encoder,
    shipped as code instead of photos. They only guard the threshold from below; real negatives do more."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            frequency = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2
            amplitude = 1.0 / np.maximum(frequency, 1e-4) ** rng.uniform(0.8, 1.2)
            channels = [
                np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((size, size))))) for _ in range(3)
            ]
            array = np.stack(channels, -1)
            array = (array - array.min()) / (np.ptp(array) + 1e-9) * 255
            images.append(Image.fromarray(array.astype(np.uint8)))
            continue
        image = Image.new("RGB", (size, size), random_colour(rng))
        draw = ImageDraw.Draw(image)
        if kind == 1:
            for _ in range(rng.integers(3, 15)):
                left, top = rng.integers(0, size, 2)
                width, height = rng.integers(10, size // 2, 2)
                shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
                shape((left, top, left + width, top + height), fill=random_colour(rng))
        elif kind == 2:
            period = int(rng.integers(4, 40))
            colour = random_colour(rng)
            for x in range(0, 2 * size, period):
                draw.line((x, 0, x - size, size), fill=colour, width=max(period // 2, 1))
        else:
            for _ in range(30):
                left, top = rng.integers(-50, size, 2)
                radius = rng.integers(10, 80)
                draw.ellipse((left, top, left + radius, top + radius), fill=random_colour(rng))
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(2, 12))))
        images.append(image)
    return images


_GENERIC_FEATURES: dict[str, torch.Tensor] = {}
_GENERIC_LOCK = threading.Lock()


def generic_negative_features(encoder: ImageEncoder) -> torch.Tensor:
    """Region embeddings of the procedural negatives, computed once per encoder and process."""
    with _GENERIC_LOCK:
        if encoder.name not in _GENERIC_FEATURES:
            _GENERIC_FEATURES[encoder.name] = embed_regions(encoder, generic_negative_images())
        return _GENERIC_FEATURES[encoder.name]


def prototype(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.mean(0), dim=0)


def leave_one_out_scores(photo_regions: Sequence[torch.Tensor], photo_views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each photo's best region against the prototype of the other photos' views: how well an unseen photo of this
    object matches its head."""
    return torch.cat(
        [
            best_region_scores(
                regions[None], prototype(torch.cat([v for other, v in enumerate(photo_views) if other != index]))
            )
            for index, regions in enumerate(photo_regions)
        ]
    )


def calibrate_threshold(
    held_out: torch.Tensor,
    generic_scores: torch.Tensor,
    band: tuple[float, float],
    std_factor: float = LOO_STD_FACTOR,
) -> tuple[float, dict[str, float]]:
    """Cosine threshold from the leave-one-out scores of the concept's own photos (`leave_one_out_scores`): their
    mean less `std_factor` standard deviations, within the encoder's band; the procedural negatives
    (`generic_scores`) push it up. Real negatives come on top (`with_real_negatives`)."""
    if len(held_out) >= 2:
        loo_rule = float(held_out.mean() - std_factor * held_out.std())
        stats = {"loo_mean": float(held_out.mean()), "loo_std": float(held_out.std()), "loo_min": float(held_out.min())}
    else:
        loo_rule = sum(band) / 2  # one photo gives no spread: use the middle of the encoder's band
        stats = {}
    threshold = min(max(loo_rule, band[0]), band[1])
    if len(generic_scores):
        stats["highest_generic_negative"] = float(generic_scores.max())
        threshold = max(threshold, stats["highest_generic_negative"] + NEGATIVE_MARGIN)
    stats["base_threshold"] = threshold
    return threshold, stats


def with_real_negatives(stats: dict[str, float], highest_negative: float) -> float:
    """The cosine threshold once real photos without the concept are known (the user's negatives, the photos of
    concepts sharing its class word): above the best-scoring one by a margin."""
    return max(stats["base_threshold"], highest_negative + NEGATIVE_MARGIN)


class ObjectHead:
    """An object concept: p = sigmoid(max over regions of weight · embedding + bias), fires at p >= threshold (0.5
    by default).

    weight = TEMPERATURE * prototype and bias = -TEMPERATURE * cosine threshold, so all object heads sharing an
    encoder are scored by one matrix product over every region of every photo and `threshold` stays a probability
    users can tune. `photos` keeps the region features of the enrolment photos, so that a later concept of the same
    kind can be calibrated against them (`recalibrate`); `rivals` names the concepts it was calibrated against.
    """

    kind = "object"

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        encoder_name: str = DEFAULT_ENCODER,
        threshold: float = 0.5,
        calibration: dict[str, float] | None = None,
        photos: torch.Tensor | None = None,
        rivals: Sequence[str] = (),
    ):
        self.weight = weight.float().reshape(-1)
        self.bias = bias.float().reshape(1)
        self.encoder_name = encoder_name
        self.threshold = float(threshold)
        self.calibration = dict(calibration or {})
        self.photos = photos
        self.rivals = sorted(set(rivals))
        self.notes: list[str] = []  # what the user should know about this head (one line each, for the CLI to show)

    @classmethod
    def train(
        cls,
        positives: Sequence[Image.Image],
        negatives: Sequence[Image.Image] | None = None,
        encoder: str | ImageEncoder = DEFAULT_ENCODER,
        seed: int = 0,
    ) -> ObjectHead:
        """Embed each positive (its regions) and its augmented views once, average the photos and views into the
        prototype, calibrate on best-region scores as photos are scored at detection time."""
        if not positives:
            raise MyVLMError("an object concept needs at least one photo")
        image_encoder = get_encoder(encoder) if isinstance(encoder, str) else encoder
        if getattr(image_encoder, "trained_probe", False):
            head = cls._train_region_probe(positives, negatives, image_encoder, seed)
        else:
            head = cls._train_prototype(positives, negatives, image_encoder, seed)
        if len(positives) < MIN_PHOTOS:
            head.notes.append(
                f"only {len(positives)} photo{'s' * (len(positives) > 1)}: with fewer than {MIN_PHOTOS} the threshold "
                "cannot be calibrated on the object's own photos; add more for reliable detection"
            )
        return head

    @classmethod
    def _train_prototype(cls, positives, negatives, image_encoder, seed: int) -> ObjectHead:
        photo_regions = embed_regions(image_encoder, list(positives))
        photo_views = [
            photo_view_features(image_encoder, image, regions[:1], seed=seed)
            for image, regions in zip(positives, photo_regions, strict=True)
        ]
        direction = prototype(torch.cat(photo_views))
        generic = best_region_scores(generic_negative_features(image_encoder), direction)
        band = getattr(image_encoder, "similarity_band", DEFAULT_BAND)
        held_out = leave_one_out_scores(photo_regions, photo_views) if len(positives) > 1 else torch.empty(0)
        cosine_threshold, stats = calibrate_threshold(held_out, generic, band)
        stats.update(cosine_threshold=cosine_threshold, positives=len(positives), negatives=len(negatives or []))
        stats["held_out"] = [round(float(score), 4) for score in held_out]  # cosines, each photo against the others
        head = cls(
            TEMPERATURE * direction,
            torch.tensor([-TEMPERATURE * cosine_threshold]),
            image_encoder.name,
            0.5,
            stats,
            photos=photo_regions,
        )
        if negatives:
            head.recalibrate(embed_regions(image_encoder, list(negatives)))
        return head

    @classmethod
    def _train_region_probe(cls, positives, negatives, image_encoder, seed: int) -> ObjectHead:
        """Region encoders whose patch features are linearly readable (a VLM's vision tower): a trained probe at the
        best patch, against the procedural negatives and the user's own."""
        rng = random.Random(seed)
        views = [view for image in positives for view in probe_views(image.convert("RGB"), rng)]
        negative_regions = [generic_negative_features(image_encoder)]
        if negatives:
            negative_regions.append(embed_regions(image_encoder, list(negatives)))
        view_regions = embed_regions(image_encoder, views)
        negative_regions = torch.cat(negative_regions)
        weight, bias, stats = train_region_probe(view_regions, negative_regions, seed=seed)
        stats.update(positives=len(positives), negatives=len(negatives or []), method="region probe")
        if len(positives) > 1:  # each photo's logit under a probe trained without its views: how an unseen photo fares
            per_photo = view_regions.reshape(len(positives), -1, *view_regions.shape[1:])
            stats["held_out"] = [round(v, 4) for v in held_out_logits(per_photo, negative_regions, seed=seed)]
        return cls(weight, bias, image_encoder.name, 0.5, stats)

    def recalibrate(self, negative_regions: torch.Tensor, rivals: Sequence[str] = ()) -> None:
        """Raise the threshold above [N, R, D] region features of photos without the concept (the user's negatives,
        or the photos of `rivals`, concepts of the same kind); earlier negatives keep counting."""
        if "base_threshold" not in self.calibration or not len(negative_regions):
            return
        scores = best_region_scores(negative_regions.float(), self.weight / TEMPERATURE)
        highest = max(float(scores.max()), self.calibration.get("highest_negative", -1.0))
        cosine_threshold = with_real_negatives(self.calibration, highest)
        self.calibration.update(highest_negative=highest, cosine_threshold=cosine_threshold)
        self.bias = torch.tensor([-TEMPERATURE * cosine_threshold])
        self.rivals = sorted(set(self.rivals) | set(rivals))

    def held_out_scores(self) -> list[float]:
        """Each enrolment photo's score (a detection's probability) under a head calibrated without it: how a new
        photo of the concept would fare against `threshold`. Empty for a head trained from one photo."""
        held_out = torch.tensor(self.calibration.get("held_out", []), dtype=torch.float32)
        if self.calibration.get("method") == "region probe":  # logits of the probes trained without each photo
            return torch.sigmoid(held_out).tolist()
        return torch.sigmoid(TEMPERATURE * held_out + self.bias).tolist()  # cosines, under this head's threshold

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """From [N, D] photo embeddings or [N, R, D] region embeddings (`embed_regions`, the best region counts)."""
        return torch.sigmoid(best_region_scores(features, self.weight) + self.bias)

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}
        if self.photos is not None:
            tensors["photos"] = self.photos.float().contiguous()
        return tensors

    def config(self) -> dict:
        return {
            "type": "object",
            "kind": self.kind,
            "encoder": self.encoder_name,
            "threshold": self.threshold,
            "dim": int(self.weight.shape[0]),
            "calibration": self.calibration,
            "rivals": self.rivals,
        }

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> ObjectHead:
        calibration = config.get("calibration")
        return cls(
            tensors["weight"],
            tensors["bias"],
            config["encoder"],
            config["threshold"],
            calibration,
            photos=tensors.get("photos"),
            rivals=config.get("rivals", ()),
        )


def calibrate_together(name: str, head: ObjectHead, others: dict[str, ObjectHead]) -> list[str]:
    """Concepts of one kind (sharing a class word) are each other's hardest negatives: calibrate the new head
    against the other concepts' enrolment photos and each of them against the new one's. Returns the names of the
    other heads that changed (to be saved); heads of another encoder or without stored photos are left alone."""
    changed = []
    for other_name, other in others.items():
        if other.encoder_name != head.encoder_name or other.photos is None or head.photos is None:
            continue
        head.recalibrate(other.photos, rivals=[other_name])
        other.recalibrate(head.photos, rivals=[name])
        changed.append(other_name)
    return changed
