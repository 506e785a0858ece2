"""Loading user photos: every bad file becomes one clear MyVLMError naming the file and the problem."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from myvlm.errors import MyVLMError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 64_000_000  # larger than any camera photo; beyond it we suspect a decompression bomb
# VLM processors resize every photo to their own input size (224-448 px), so small photos are upscaled and work;
# under 8 px a side there is no content left to recognize, so that is refused rather than silently captioned.
MIN_SIDE = 8
# Photos are reduced on load to at most this many pixels (1024x1024 worth, aspect kept: 1182x887 for a 4:3 phone
# photo): object heads squash a photo to 224 px, VLM processors to 224-448 px, and the face detector upsamples photos
# this size once, finding faces down to ~40 px (~140 px in a 12-MP original). So a 12-MP photo costs what a 1-MP one
# does. JPEGs are decoded at 1/2, 1/4 or 1/8 scale (draft mode): the full-size pixels are never held in memory.
LOAD_PIXELS = 1024 * 1024


def load_image(path: str | os.PathLike, max_pixels: int | None = LOAD_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB, applying EXIF rotation and taking the first frame of animations, reduced to at
    most `max_pixels` pixels (None keeps the full size). `image.info["original_size"]` is the size before
    reduction (after rotation), to map boxes back to the file's pixels."""
    path = Path(path)
    try:
        if not path.exists():
            raise MyVLMError(f"{path}: no such file")
        if path.is_dir():
            raise MyVLMError(f"{path}: is a folder, not an image")
        if not path.is_file():  # a FIFO or device would block or stream forever
            raise MyVLMError(f"{path}: not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" and the like: the pixels still load
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise MyVLMError(
                        f"{path}: image is {image.width}x{image.height}, over the {MAX_PIXELS:,}-pixel limit"
                    )
                image.seek(0)
                full_width = image.width
                if max_pixels is not None and image.width * image.height > max_pixels:  # JPEG: 1/2, 1/4, 1/8 scale
                    scale = math.sqrt(max_pixels / (image.width * image.height))
                    image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
                image.load()
                draft_factor = full_width / image.width
                image = to_rgb(ImageOps.exif_transpose(image))
    except MyVLMError:
        raise
    except PermissionError:
        raise MyVLMError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise MyVLMError(f"{path}: not an image (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MyVLMError(f"{path}: image dimensions are too large (possible decompression bomb)") from None
    except Exception as error:  # noqa: BLE001 - Pillow's decoders raise many types (struct.error, IndexError, ...)
        detail = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
        raise MyVLMError(f"{path}: corrupt or truncated image ({detail})") from None
    if min(image.size) < MIN_SIDE:
        raise MyVLMError(f"{path}: image is {image.width}x{image.height}, too small (under {MIN_SIDE} px on a side)")
    original = (round(image.width * draft_factor), round(image.height * draft_factor))  # rotated, before reduction
    if max_pixels is not None and image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(MIN_SIDE, int(image.width * scale)), max(MIN_SIDE, int(image.height * scale)))
        image = image.resize(size, Image.LANCZOS, reducing_gap=2.0)
    image.info["original_size"] = original
    return image


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
    return image.convert("RGB")


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (non-recursive folders, sorted) into image paths; an empty result is an error.

    Named files are kept even when missing or unreadable, so that load_image reports each one by name."""
    paths = [Path(raw) for raw in paths]
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            try:
                found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()))
            except OSError as error:
                raise MyVLMError(f"{path}: cannot list folder ({error.strerror or error})") from None
        else:
            found.append(path)
    if not found:
        raise MyVLMError(f"no images found in {', '.join(str(p) for p in paths)}")
    return found


def file_box(box, image: Image.Image) -> list[float] | None:
    """A box found on a loaded photo, in the photo file's pixels: photos are reduced on load (LOAD_PIXELS), and
    `image.info["original_size"]` says from what."""
    if not box:
        return None
    width, height = image.info.get("original_size", image.size)
    sx, sy = width / image.width, height / image.height
    return [round(v * s, 1) for v, s in zip(box, (sx, sy, sx, sy), strict=True)]
