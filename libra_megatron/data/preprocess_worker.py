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
from libra_megatron.data.records import DEFAULT_MAX_IMAGE_BYTES, IMAGE_EXTENSIONS, RawRecord
from libra_megatron.data.rejects import Rejected
from libra_megatron.data.safe_read import read_image_file
from libra_megatron.data.samples import DEFAULT_MAX_CAPTION_TOKENS, Piece, SampleError, instruct_pieces, pretrain_pieces
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
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_caption_tokens: int = DEFAULT_MAX_CAPTION_TOKENS


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


def read_image_bytes(record: RawRecord, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The image bytes of a record (tar member, or the first existing candidate path inside the image root)."""
    if record.image_bytes is not None:
        return record.image_bytes
    if not record.image_paths:
        raise SampleError("missing_image", "the record names no image")
    if record.image_root is None:
        raise SampleError("unsafe_path", f"{record.image_paths[0]}: no image root to keep the path inside")
    return read_image_file(record.image_paths, record.image_root, max_bytes)


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
            pieces = pretrain_pieces(settings.tokenizer, record.caption, settings.max_caption_words,
                                     settings.max_caption_tokens)
        else:
            pieces = instruct_pieces(settings.tokenizer, record.conversations, record.has_image)
        if not record.has_image:
            return Prepared(record.source, record.key, pieces, None, None)
        data = read_image_bytes(record, settings.max_image_bytes)
        image = decode_image(data, record.image_name, settings.max_image_pixels)
        pixels = to_model_pixels(image, settings.image_size).numpy()
        return Prepared(record.source, record.key, pieces, pixels, encode_pixels(pixels, settings.pixel_format))
    except SampleError as exc:
        where = f"line {record.line}: " if record.line is not None and not exc.detail.startswith("line ") else ""
        return Rejected(record.source, record.key, exc.reason, where + exc.detail)
    except Exception as exc:  # noqa: BLE001 - one bad sample must never stop the job
        return Rejected(record.source, record.key, "unexpected_error", f"{type(exc).__name__}: {exc}")


_WORKER_SETTINGS: Optional[PrepareSettings] = None


def init_worker(settings: PrepareSettings) -> None:
    """Pool initialiser: keep the settings and use one intra-op thread (the pool is the parallelism)."""
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings
    import torch

    torch.set_num_threads(1)


FAULT_FILE_ENV = "LIBRA_PREPROCESS_FAULT_FILE"


def _injected_fault(record: RawRecord) -> None:
    """Test-only fault injection: when ``$LIBRA_PREPROCESS_FAULT_FILE`` names a file holding lines
    ``SUBSTRING ACTION COUNT`` (ACTION ``kill`` or ``hang``), a worker preparing a record whose image name contains
    SUBSTRING decrements COUNT and then SIGKILLs itself or sleeps for ever (a worker the OOM killer hits, a
    decoder stuck in a loop). Costs one environment lookup per record when unset."""
    path = os.environ.get(FAULT_FILE_ENV)
    if not path or not record.image_name:
        return
    import fcntl
    import signal
    import time

    with open(path, "r+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        rules = [line.split() for line in handle.read().splitlines() if line.strip()]
        action = None
        for rule in rules:
            if rule[0] in record.image_name and int(rule[2]) > 0:
                rule[2], action = str(int(rule[2]) - 1), rule[1]
                break
        handle.seek(0)
        handle.truncate()
        handle.write("".join(" ".join(rule) + "\n" for rule in rules))
        handle.flush()
        os.fsync(handle.fileno())
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        while True:
            time.sleep(3600)


def prepare_in_worker(record: RawRecord) -> Union[Prepared, Rejected]:
    """:func:`prepare_record` with the worker's settings."""
    assert _WORKER_SETTINGS is not None, "init_worker was not called"
    _injected_fault(record)
    return prepare_record(record, _WORKER_SETTINGS)
