"""The raw record of the preprocessing job: one input sample before decoding, as the readers hand it to the workers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024  # --max-image-bytes: no image file or tar member is read above this


@dataclass
class RawRecord:
    """One input sample before decoding: where it is from, its image (bytes or a path) and its text."""

    source: str
    key: str
    kind: str  # "pretrain" (image + caption) or "instruct" (conversation, optional image)
    image_name: Optional[str] = None  # file or member name (for the extension check)
    image_bytes: Optional[bytes] = None
    image_paths: Sequence[str] = ()  # candidate paths, tried in order (LLaVA's '-' -> '_' retry)
    image_root: Optional[str] = None  # image_paths must resolve inside this folder (after symbolic links)
    caption: Optional[str] = None
    caption_error: Optional[str] = None  # a caption that exists but could not be read (reason code)
    conversations: Optional[List[Dict[str, Any]]] = None
    has_image: bool = True
    line: Optional[int] = None  # line of the annotation file the record starts on (for reject details)
