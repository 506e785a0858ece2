"""Loading user photos: every bad file becomes one clear MyVLMError naming the file and the problem."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from myvlm.errors import MyVLMError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 64_000_000  # larger than any camera photo; beyond it we suspect a decompression bomb
MIN_SIDE = 8


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB, applying EXIF rotation and taking the first frame of animations."""
    path = Path(path)
    if not path.exists():
        raise MyVLMError(f"{path}: no such file")
    if path.is_dir():
        raise MyVLMError(f"{path}: is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise MyVLMError(
                        f"{path}: image is {image.width}x{image.height}, over the {MAX_PIXELS:,}-pixel limit"
                    )
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except MyVLMError:
        raise
    except PermissionError:
        raise MyVLMError(f"{path}: permission denied") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise MyVLMError(f"{path}: not a readable image ({type(error).__name__})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise MyVLMError(f"{path}: corrupt or truncated image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (CMYK, LA, P, 16-bit I;16, float F) to RGB, compositing alpha on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.size else 1.0
        scale = 255.0 / top if top > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if min(image.size) < MIN_SIDE:
        raise MyVLMError(f"image is {image.width}x{image.height}: too small (under {MIN_SIDE} px on a side)")
    return image


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (non-recursive folders, sorted) into image paths; an empty result is an error."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()))
        elif path.exists():
            found.append(path)
        else:
            raise MyVLMError(f"{path}: no such file or folder")
    if not found:
        raise MyVLMError(f"no images found in {', '.join(str(p) for p in paths)}")
    return found
