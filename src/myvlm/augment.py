"""The official MyVLM training augmentations with Pillow/NumPy (no torchvision): flip, brightness, rotation."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from myvlm.images import to_rgb

# Modes whose brightness Pillow can change as they are; other photos are augmented as RGB.
BLENDABLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")


def augment(
    image: Image.Image,
    rng: np.random.Generator,
    *,
    flip_p: float = 0.5,
    brightness: float = 0.6,
    max_degrees: float = 45.0,
) -> Image.Image:
    """One random view: horizontal flip (p=0.5), brightness factor in [1-0.6, 1+0.6], rotation in ±45°."""
    if image.mode not in BLENDABLE_MODES:  # palette, 1-bit, 16/32-bit: Pillow cannot blend them to change brightness
        image = to_rgb(image)
    if rng.random() < flip_p:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    factor = float(rng.uniform(max(0.0, 1 - brightness), 1 + brightness))
    image = ImageEnhance.Brightness(image).enhance(factor)
    angle = float(rng.uniform(-max_degrees, max_degrees))
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)  # black in every mode (RGB, L, RGBA)
