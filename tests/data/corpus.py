"""Small generated corpora for the data tests: images of several sizes and modes, in every input layout."""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

# (name, width, height, PIL mode, file format)
IMAGE_SPECS: List[Tuple[str, int, int, str, str]] = [
    ("rgb_wide.jpg", 64, 48, "RGB", "JPEG"),
    ("gray_tall.png", 40, 90, "L", "PNG"),
    ("rgba_square.png", 100, 100, "RGBA", "PNG"),
    ("palette_small.png", 30, 20, "P", "PNG"),
    ("rgb_large.webp", 500, 200, "RGB", "WEBP"),
    ("cmyk.jpg", 50, 70, "CMYK", "JPEG"),
    ("gray16.png", 31, 29, "I;16", "PNG"),
    ("bilevel.bmp", 33, 17, "1", "BMP"),
]

CAPTIONS = {
    "rgb_wide.jpg": ("A Dog ** on the  grass #1", "a dog on the grass 1"),
    "gray_tall.png": ("  Two~cats\tsitting   ON a  Table ", "two cats\tsitting on a table"),
    "rgba_square.png": ("a red bus", "a red bus"),
    "palette_small.png": ("Small HOUSE", "small house"),
    "rgb_large.webp": ("the sky over the river and the trees", "the sky over the river and the trees"),
    "cmyk.jpg": ("a cup of food", "a cup of food"),
    "gray16.png": ("snow on a mountain", "snow on a mountain"),
    "bilevel.bmp": ("a sign " + " ".join(["road"] * 70), "a sign " + " ".join(["road"] * 62)),
}


def make_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """A structured RGB picture (gradients + a little noise) converted to ``mode``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) * 3) % 256], -1)
    rgb = np.clip(rgb + rng.integers(-12, 12, size=rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray((x * 2 % 256).astype(np.uint8), "L")
        image = image.convert("RGBA")
        image.putalpha(alpha)
        return image
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 3)
        assert image.mode == "I;16"
        return image
    return image.convert(mode)


def image_bytes(image: Image.Image, file_format: str) -> bytes:
    buffer = io.BytesIO()
    kwargs = {"lossless": True} if file_format == "WEBP" else {}
    image.save(buffer, format=file_format, **kwargs)
    return buffer.getvalue()


def write_images(folder: str) -> Dict[str, bytes]:
    """Write every image of :data:`IMAGE_SPECS` into ``folder``; return name -> file bytes."""
    os.makedirs(folder, exist_ok=True)
    files = {}
    for seed, (name, width, height, mode, file_format) in enumerate(IMAGE_SPECS):
        data = image_bytes(make_image(width, height, mode, seed), file_format)
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)
        files[name] = data
    return files


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: List[Tuple[str, Dict[str, bytes]]]) -> None:
    """A webdataset tar: ``samples`` = [(key, {ext: bytes})], members in order."""
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for ext, data in members.items():
                add_member(archive, f"{key}.{ext}", data)


def caption_json(caption: str) -> bytes:
    return json.dumps({"caption": caption, "url": "http://example.invalid"}).encode()
