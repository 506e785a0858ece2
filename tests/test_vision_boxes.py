"""Where a vision tower's regions lie in a photo, so that a toy concept's detection has a box: the patch grid over
the square the tower sees (the centre square where the processor crops, the whole photo where it squashes)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoProcessor

from myvlm.vision_encoder import VisionTowerEncoder

MODELS = Path(str(resources.files("myvlm.toyworld"))) / "models"


class ProcessorOnly:
    """What `region_boxes_of` reads of a backend: its processor (no model weights needed)."""

    def __init__(self, model: str) -> None:
        self.processor = AutoProcessor.from_pretrained(MODELS / model)


@pytest.mark.parametrize(
    ("model", "wide_photo_square"), [("toy-llava", [0.25, 0, 0.75, 1]), ("toy-blip2", [0, 0, 1, 1])]
)
def test_patch_grid_in_photo_fractions(model, wide_photo_square):
    encoder = VisionTowerEncoder.__new__(VisionTowerEncoder)  # the boxes need the processor only
    encoder.backend = ProcessorOnly(model)
    boxes = encoder.region_boxes_of([Image.new("RGB", (128, 64)), Image.new("RGB", (64, 64))], regions=1 + 8 * 8)
    assert boxes.shape == (2, 65, 4)
    assert boxes[0, 0].tolist() == wide_photo_square  # toy-llava crops the centre square, toy-blip2 squashes
    assert boxes[1, 0].tolist() == [0, 0, 1, 1] and boxes[1, 1].tolist() == [0, 0, 0.125, 0.125]
    assert boxes[1, 8].tolist() == [0.875, 0, 1, 0.125] and boxes[1, 9].tolist() == [0, 0.125, 0.125, 0.25]  # by rows
    assert encoder.region_boxes_of([Image.new("RGB", (64, 64))], regions=1 + 10) is None  # not a square grid
