"""A VLM's own frozen vision tower as an object-head encoder (the default for toy models, which see toy scenes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from myvlm.heads import register_encoder


class VisionTowerEncoder:
    """CLS, mean and max of the last vision layer: mean/max keep small marks (a hat, dots) visible to a linear head."""

    def __init__(self, vlm) -> None:
        self.vlm = vlm
        self.name = encoder_name(vlm.model_id)
        self.tower = vlm.model.vision_model if vlm.family == "blip2" else vlm.model.model.vision_tower
        self.dim = 3 * self.tower.config.hidden_size

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.vlm.backend.pixel_values(images).to(self.vlm.backend.device, self.vlm.backend.dtype)
        hidden = self.tower(pixel_values=pixels).last_hidden_state.float()
        features = torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1), hidden[:, 1:].amax(dim=1)], dim=-1)
        return F.normalize(features, dim=-1).cpu()


def encoder_name(model_id: str) -> str:
    return f"vision-tower:{model_id}"


def register_vision_tower(vlm) -> str:
    """Make `vision-tower:<model id>` available to object heads while this VLM is loaded."""
    name = encoder_name(vlm.model_id)
    register_encoder(name, lambda: VisionTowerEncoder(vlm))
    return name
