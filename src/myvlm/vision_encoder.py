"""A VLM's own frozen vision tower as an object-head encoder (the default for toy models, which see toy scenes).

The backend says which module is its vision tower and how images become its pixels; this adapter only gives it the
`ImageEncoder` shape heads expect. Callers that load VLMs (`myvlm.model.resolve_encoder`) resolve the encoder name
`vision-tower:MODEL`; the heads layer never loads a VLM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

PREFIX = "vision-tower:"


def encoder_name(model_id: str) -> str:
    return f"{PREFIX}{model_id}"


def tower_encoder_names(heads) -> list[str]:
    """The `vision-tower:MODEL` encoders that these heads' object heads score with (face heads have none)."""
    names = {getattr(head, "encoder_name", "") for head in heads}
    return sorted(name for name in names if name.startswith(PREFIX))


class VisionTowerEncoder:
    """The last vision layer's patch features as regions (the mean of all patches first): a concept's distinguishing
    mark covers a few patches, and a probe scored at the best patch sees it where a pooled embedding averages it away.
    The tower was trained to make such per-patch attributes linearly readable, so its heads are trained probes."""

    trained_probe = True

    def __init__(self, backend, model_id: str) -> None:
        self.backend = backend
        self.name = encoder_name(model_id)
        self.dim = backend.tower_width

    @torch.no_grad()
    def embed_regions(self, images: Sequence[Image.Image]) -> torch.Tensor:
        patches = self.backend.tower_patches(images).float()
        return F.normalize(torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1), dim=-1).cpu()

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.embed_regions(images)[:, 0]
