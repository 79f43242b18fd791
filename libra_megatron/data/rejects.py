"""Reject log of the preprocessing job: every skipped input, with its source and a short reason code.

Reasons (``Rejected.reason``):

================== ==================================================================================
missing_image      the record names no image, the image file does not exist, or a tar sample has none
unreadable_image   the image file exists but cannot be read (permissions, a directory, I/O error)
empty_file         the image file has zero bytes
corrupt_image      the bytes are not a decodable image
truncated_image    the image data ends early
decompression_bomb width x height above ``--max-image-pixels``
wrong_extension    the file extension is not an image type, or disagrees with the decoded format
zero_size_image    an image with zero width or height
missing_caption    no caption field (json ``caption`` / ``.txt``)
empty_caption      the caption is empty after cleaning
bad_caption        the caption cannot be tokenised as expected
bad_record         a malformed annotation line/entry (bad JSON, wrong types)
bad_conversation   conversation turns missing, unknown roles, or not alternating human/gpt
image_tag_mismatch the number of ``<image>`` tags does not match the number of images
empty_turn         an empty human or assistant turn
unsafe_member_path a tar member whose path escapes the archive (absolute, ``..``) or is a link/device
unreadable_shard   a tar shard that cannot be opened or read to the end (the rest of the shard is lost)
unexpected_error   any other exception while preparing the record (message in ``detail``)
================== ==================================================================================
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Dict, Iterable


@dataclass(frozen=True)
class Rejected:
    """One skipped input: where it came from, which record, why."""

    source: str
    key: str
    reason: str
    detail: str

    def to_json(self) -> Dict[str, str]:
        return asdict(self)


def count_by_reason(rejects: Iterable[Dict[str, str]]) -> Dict[str, int]:
    """``{reason: count}`` sorted by reason (for the summary and the sidecar)."""
    counts = Counter(r["reason"] for r in rejects)
    return dict(sorted(counts.items()))
