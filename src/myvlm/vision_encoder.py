"""A VLM's own frozen vision tower as an object-head encoder (the default for toy models, which see toy scenes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from myvlm.heads import register_encoder


class VisionTowerEncoder:
    """The last vision layer's patch features as regions (the mean of all patches first): a concept's distinguishing
    mark covers a few patches, and a probe scored at the best patch sees it where a pooled embedding averages it away.
    The tower was trained to make such per-patch attributes linearly readable, so its heads are trained probes."""

    trained_probe = True

    def __init__(self, vlm) -> None:
        self.vlm = vlm
        self.name = encoder_name(vlm.model_id)
        self.tower = vlm.model.vision_model if vlm.family == "blip2" else vlm.model.model.vision_tower
        self.dim = self.tower.config.hidden_size

    @torch.no_grad()
    def embed_regions(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.vlm.backend.pixel_values(images).to(self.vlm.backend.device, self.vlm.backend.dtype)
        patches = self.tower(pixel_values=pixels).last_hidden_state[:, 1:].float()
        return F.normalize(torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1), dim=-1).cpu()

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.embed_regions(images)[:, 0]


def encoder_name(model_id: str) -> str:
    return f"vision-tower:{model_id}"


def register_vision_tower(vlm) -> str:
    """Make `vision-tower:<model id>` available to object heads while this VLM is loaded."""
    name = encoder_name(vlm.model_id)
    register_encoder(name, lambda: VisionTowerEncoder(vlm))
    return name


def load_vision_tower(name: str) -> VisionTowerEncoder:
    """`vision-tower:<model id>` for commands that load no VLM themselves (`concept add`, `detect`)."""
    from myvlm.model import load

    return VisionTowerEncoder(load(name.removeprefix("vision-tower:")))
