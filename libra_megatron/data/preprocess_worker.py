"""Per-record work of the preprocessing job, run in the ``--workers`` processes: read and validate the image,
make the model pixels and their stored encoding, clean and tokenise the text into sample pieces. A bad record
becomes a :class:`~libra_megatron.data.rejects.Rejected` with its reason; nothing here raises on bad data.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from libra_megatron.data.pixel_codec import encode_pixels
from libra_megatron.data.rejects import Rejected
from libra_megatron.data.samples import Piece, SampleError, instruct_pieces, pretrain_pieces
from libra_megatron.data.sources import IMAGE_EXTENSIONS, RawRecord
from libra_megatron.data.text_tokenizer import TextTokenizer
from libra_megatron.tokenizer.image_processing import IMAGE_SIZE, to_model_pixels

# Formats PIL may report for each extension (JPEG files with EXIF thumbnails open as MPO).
EXTENSION_FORMATS = {
    "jpg": {"JPEG", "MPO"}, "jpeg": {"JPEG", "MPO"}, "png": {"PNG"}, "webp": {"WEBP"}, "bmp": {"BMP", "DIB"},
    "gif": {"GIF"}, "tif": {"TIFF"}, "tiff": {"TIFF"}, "ppm": {"PPM"},
}
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default decompression-bomb limit (~ 9459 x 9459)


@dataclass
class PrepareSettings:
    """What every worker needs (pickled once per worker)."""

    tokenizer: TextTokenizer
    pixel_format: str
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_caption_words: int = 64
    image_size: int = IMAGE_SIZE


@dataclass
class Prepared:
    """A record ready for image tokenisation and writing."""

    source: str
    key: str
    pieces: List[Piece]
    pixels: Optional[np.ndarray]  # uint8 [3, S, S], or None for a text-only sample
    blob: Optional[bytes]  # the stored encoding of ``pixels``


def _extension(name: Optional[str]) -> str:
    base = os.path.basename(name or "")
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def read_image_bytes(record: RawRecord) -> bytes:
    """The image bytes of a record (tar member or first existing candidate path)."""
    if record.image_bytes is not None:
        return record.image_bytes
    if not record.image_paths:
        raise SampleError("missing_image", "the record names no image")
    for path in record.image_paths:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            continue
        except OSError as exc:  # a directory, permissions, I/O error
            raise SampleError("unreadable_image", f"{path}: {exc.strerror or exc}") from exc
    raise SampleError("missing_image", f"file not found: {record.image_paths[0]}")


def decode_image(data: bytes, name: Optional[str], max_pixels: int) -> Image.Image:
    """Validate and fully decode image bytes; raises :class:`SampleError` with the reject reason."""
    if len(data) == 0:
        raise SampleError("empty_file", f"{name}: zero bytes")
    extension = _extension(name)
    if extension not in IMAGE_EXTENSIONS:
        raise SampleError("wrong_extension", f"{name}: '.{extension}' is not an image extension")
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise SampleError("decompression_bomb", f"{name}: {width}x{height} > {max_pixels} pixels")
                if width == 0 or height == 0:
                    raise SampleError("zero_size_image", f"{name}: {width}x{height}")
                if image.format not in EXTENSION_FORMATS[extension]:
                    raise SampleError("wrong_extension", f"{name}: '.{extension}' file holds {image.format} data")
                image.load()
                return image.copy()
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError("decompression_bomb", f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise SampleError("corrupt_image", f"{name}: not a decodable image") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL decoders raise all of these
        message = str(exc)
        reason = "truncated_image" if "truncat" in message.lower() else "corrupt_image"
        raise SampleError(reason, f"{name}: {message}") from exc


def prepare_record(record: RawRecord, settings: PrepareSettings) -> Union[Prepared, Rejected]:
    """Text pieces + model pixels + stored pixel bytes of one record, or its rejection."""
    try:
        if record.kind == "pretrain":
            if record.caption_error:
                raise SampleError("missing_caption", record.caption_error)
            pieces = pretrain_pieces(settings.tokenizer, record.caption, settings.max_caption_words)
        else:
            pieces = instruct_pieces(settings.tokenizer, record.conversations, record.has_image)
        if not record.has_image:
            return Prepared(record.source, record.key, pieces, None, None)
        image = decode_image(read_image_bytes(record), record.image_name, settings.max_image_pixels)
        pixels = to_model_pixels(image, settings.image_size).numpy()
        return Prepared(record.source, record.key, pieces, pixels, encode_pixels(pixels, settings.pixel_format))
    except SampleError as exc:
        return Rejected(record.source, record.key, exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - one bad sample must never stop the job
        return Rejected(record.source, record.key, "unexpected_error", f"{type(exc).__name__}: {exc}")


_WORKER_SETTINGS: Optional[PrepareSettings] = None


def init_worker(settings: PrepareSettings) -> None:
    """Pool initialiser: keep the settings and use one intra-op thread (the pool is the parallelism)."""
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings
    import torch

    torch.set_num_threads(1)


def prepare_in_worker(record: RawRecord) -> Union[Prepared, Rejected]:
    """:func:`prepare_record` with the worker's settings."""
    assert _WORKER_SETTINGS is not None, "init_worker was not called"
    return prepare_record(record, _WORKER_SETTINGS)
