"""Image preprocessing of the Libra vision path (docs/architecture.md#image-preprocessing), shared by the tokenizer, the preprocessing tool
and training.

Two steps, split where the pipeline stores data:

* :func:`to_model_pixels` (PIL image -> ``uint8 [3, 336, 336]``): convert to RGB the way the reference loaders
  do (``PIL.Image.convert("RGB")``), pad to a square with the CLIP mean colour ``(122, 116, 104)`` centred as
  the reference ``expand2square`` does, resize the shortest edge to 336 with PIL bicubic (the output size is
  rounded exactly like transformers' ``get_resize_output_image_size``), centre-crop 336x336. This is what the
  indexed binaries store (1/4 of the float bytes).
* :func:`normalize_pixels` (``uint8 [..., 3, 336, 336]`` -> ``float32``): rescale by 1/255 and normalise with
  the CLIP mean/std, with the same float arithmetic as transformers' ``CLIPImageProcessor`` (rescale in float64
  then cast to float32, subtract and divide in float32), so ``preprocess_image`` is bit-identical to
  ``CLIPImageProcessor(expand2square(img))`` (tested in ``tests/tokenizer/test_image_processing.py``).

Notes on the conversion to RGB (reference behaviour, deliberately kept): alpha is dropped rather than
composited onto white (transformers >= 5 composites; the reference decoded with ``convert("RGB")`` before the
processor ever saw the image), and 16-bit / 32-bit integer images are clipped to 0..255 by PIL, not rescaled.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 336
CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# The reference pads with tuple(int(x * 255) for x in image_mean): truncation, not rounding.
PAD_COLOR: Tuple[int, int, int] = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
RESCALE_FACTOR = 1 / 255


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB as the reference loaders do (``convert("RGB")``; alpha dropped)."""
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:  # modes PIL cannot convert directly (e.g. premultiplied "La")
        return image.convert("RGBA").convert("RGB")


def expand_to_square(image: Image.Image, background: Sequence[int] = PAD_COLOR) -> Image.Image:
    """Pad to a square canvas of the longer side, image centred (reference ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(background))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def shortest_edge_size(height: int, width: int, shortest_edge: int = IMAGE_SIZE) -> Tuple[int, int]:
    """Output (height, width) of a shortest-edge resize, rounded like transformers (``int(edge * long / short)``)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def to_model_pixels(image: Image.Image, size: int = IMAGE_SIZE, pad_to_square: bool = True) -> torch.Tensor:
    """PIL image (any mode) -> ``uint8 [3, size, size]``: RGB, pad to square, bicubic shortest edge, centre crop."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"to_model_pixels expects a PIL.Image.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"to_model_pixels: empty image of size {image.size}")
    image = to_rgb(image)
    if pad_to_square:
        image = expand_to_square(image)
    height, width = shortest_edge_size(image.height, image.width, size)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    top, left = (height - size) // 2, (width - size) // 2
    array = np.asarray(image, dtype=np.uint8)[top : top + size, left : left + size]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` -> float32 CLIP-normalised pixels, bit-identical to ``CLIPImageProcessor``."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels expects uint8 pixels, got {pixels.dtype}")
    if pixels.dim() < 3 or pixels.size(-3) != 3:
        raise ValueError(f"normalize_pixels expects [..., 3, H, W], got {tuple(pixels.shape)}")
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    # transformers: image.astype(float64) * (1/255) -> float32, then (x - mean) / std in float32.
    scaled = (pixels.to(torch.float64) * RESCALE_FACTOR).to(torch.float32)
    return (scaled - mean) / std


def preprocess_image(image: Image.Image) -> torch.Tensor:
    """PIL image -> float32 ``[3, 336, 336]``: ``normalize_pixels(to_model_pixels(image))``."""
    return normalize_pixels(to_model_pixels(image))


def unit_range_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (decoder output, ``[..., 3, H, W]``) -> ``uint8`` pixels (round to nearest, clamp)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def normalized_to_unit_range(pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised pixels -> [-1, 1] (the decoder's training target, reference ``VQModel.clip_to_rgb``)."""
    mean = torch.tensor(CLIP_MEAN, dtype=pixel_values.dtype, device=pixel_values.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=pixel_values.dtype, device=pixel_values.device).view(3, 1, 1)
    return 2.0 * (pixel_values * std + mean) - 1.0


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open and fully decode an image file, with an error that names the file when it is unreadable."""
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {exc}") from exc
