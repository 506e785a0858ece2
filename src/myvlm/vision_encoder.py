"""A VLM's own frozen vision tower as an object-head encoder (the default for toy models, which see toy scenes).

The backend says which module is its vision tower and how images become its pixels; this adapter only gives it the
`ImageEncoder` shape heads expect. Callers that load VLMs (`myvlm.model.resolve_encoder`) resolve the encoder name
`vision-tower:MODEL`; the heads layer never loads a VLM.
"""

from __future__ import annotations

import math
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

    def region_boxes_of(self, images: Sequence[Image.Image], regions: int) -> torch.Tensor | None:
        """[N, R, 4] (left, top, right, bottom) of each of the `regions` of `embed_regions` as fractions of each
        photo: the square the tower sees (the whole photo, or its centre where the processor crops to the shortest
        side), then one cell of the patch grid per patch, row by row. None where the patches are not a square grid."""
        side = math.isqrt(regions - 1)
        if side < 1 or side * side != regions - 1:
            return None
        cells = torch.arange(side, dtype=torch.float32) / side
        top, left = torch.meshgrid(cells, cells, indexing="ij")
        grid = torch.stack([left, top, left + 1 / side, top + 1 / side], -1).reshape(-1, 4)
        grid = torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0]]), grid])
        processor = self.backend.processor.image_processor
        size = getattr(processor, "size", None) or {}
        shortest_edge = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        crops = bool(getattr(processor, "do_center_crop", False) and shortest_edge)
        boxes = []
        for image in images:
            width, height = image.size
            if crops:  # resized so the shortest side fits, then the centre square kept: that part of the photo
                shortest = min(width, height)
                x0, y0, fx, fy = (
                    (width - shortest) / 2 / width,
                    (height - shortest) / 2 / height,
                    shortest / width,
                    shortest / height,
                )
            else:  # squashed: the whole photo
                x0, y0, fx, fy = 0.0, 0.0, 1.0, 1.0
            boxes.append(grid * torch.tensor([fx, fy, fx, fy]) + torch.tensor([x0, y0, x0, y0]))
        return torch.stack(boxes)
