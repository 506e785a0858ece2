"""The official MyVLM training augmentations with Pillow/NumPy (no torchvision): flip, brightness, rotation."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance


def augment(
    image: Image.Image,
    rng: np.random.Generator,
    *,
    flip_p: float = 0.5,
    brightness: float = 0.6,
    max_degrees: float = 45.0,
) -> Image.Image:
    """One random view: horizontal flip (p=0.5), brightness factor in [1-0.6, 1+0.6], rotation in ±45°."""
    if rng.random() < flip_p:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    factor = float(rng.uniform(max(0.0, 1 - brightness), 1 + brightness))
    image = ImageEnhance.Brightness(image).enhance(factor)
    angle = float(rng.uniform(-max_degrees, max_degrees))
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)  # black in every mode (RGB, L, RGBA)
