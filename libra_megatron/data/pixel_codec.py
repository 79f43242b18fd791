"""Lossless storage of the model pixels (``uint8 [3, 336, 336]``, what ``to_model_pixels`` returns).

Formats (the sidecar records which one a dataset uses; every one decodes to exactly the stored tensor):

* ``webp`` (default): WebP lossless, ``method=1, quality=0``. On photos ~110-140 KB per image (vs 331 KB raw),
  ~10 ms to encode and ~3 ms to decode per image on one core (figures in docs/benchmarks.md).
* ``png``: PNG, zlib level 6. ~15% larger than ``webp`` and ~2x slower to encode.
* ``raw``: the uint8 bytes (338,688 per image); no decode cost.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

PIXEL_FORMATS = ("webp", "png", "raw")
DEFAULT_PIXEL_FORMAT = "webp"


def encode_pixels(pixels: torch.Tensor | np.ndarray, pixel_format: str = DEFAULT_PIXEL_FORMAT) -> bytes:
    """``uint8 [3, H, W]`` -> bytes in ``pixel_format``."""
    array = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"encode_pixels expects uint8 [3, H, W], got {array.dtype} {array.shape}")
    if pixel_format == "raw":
        return np.ascontiguousarray(array).tobytes()
    image = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    buffer = io.BytesIO()
    if pixel_format == "webp":
        image.save(buffer, format="WEBP", lossless=True, method=1, quality=0, exact=True)
    elif pixel_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        raise ValueError(f"unknown pixel format {pixel_format!r}; expected one of {PIXEL_FORMATS}")
    return buffer.getvalue()


def decode_pixels(data: bytes, pixel_format: str, size: int) -> torch.Tensor:
    """Bytes written by :func:`encode_pixels` -> ``uint8 [3, size, size]``."""
    if pixel_format == "raw":
        array = np.frombuffer(data, dtype=np.uint8)
        if array.size != 3 * size * size:
            raise ValueError(f"raw pixels hold {array.size} bytes, expected {3 * size * size}")
        return torch.from_numpy(array.reshape(3, size, size).copy())
    if pixel_format not in PIXEL_FORMATS:
        raise ValueError(f"unknown pixel format {pixel_format!r}; expected one of {PIXEL_FORMATS}")
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"))
    if array.shape != (size, size, 3):
        raise ValueError(f"stored image is {array.shape[1]}x{array.shape[0]}, expected {size}x{size}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
