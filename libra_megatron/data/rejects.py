"""Reject log of the preprocessing job: every skipped input, with its source and a short reason code.

Reasons (``Rejected.reason``):

================== ==================================================================================
missing_image      the record names no image, the image file does not exist, or a tar sample has none
unsafe_path        the image path resolves (after symbolic links) outside ``--image-root``; never opened
not_regular_file   the image path is a folder, named pipe, device or socket; never opened
image_too_large    the image file or tar member is above ``--max-image-bytes``; never read
unreadable_image   the image file exists but cannot be read (permissions, I/O error)
empty_file         the image file has zero bytes
corrupt_image      the bytes are not a decodable image
truncated_image    the image data ends early
decompression_bomb width x height above ``--max-image-pixels``
wrong_extension    the file extension is not an image type, or disagrees with the decoded format
zero_size_image    an image with zero width or height
missing_caption    no caption field (json ``caption`` / ``.txt``)
empty_caption      the caption is empty after cleaning
bad_caption        the caption cannot be tokenised as expected
bad_record         a malformed annotation line/entry (bad JSON, not UTF-8, a field of the wrong type)
bad_conversation   conversation turns missing, unknown roles, or not alternating human/gpt
image_tag_mismatch the number of ``<image>`` tags does not match the number of images
empty_turn         an empty human or assistant turn
unsafe_member_path a tar member whose path escapes the archive (absolute, ``..``) or is a link/device
duplicate_key      a webdataset key used by more than one sample of a shard (never merged)
unreadable_shard   a tar shard that is not a (compressed) tar archive at all
shard_io_error     an I/O error (``OSError``) while opening or reading a shard (retryable: the next run rereads it)
truncated_shard    a shard cut inside a member (that sample), or without its end-of-archive marker (the tail,
                   reported under the last good key); every complete sample before it is kept
worker_crash       the decode worker died on the record twice (retryable: the next run retries it)
timeout            the decode worker gave no result within ``--worker-timeout`` twice (retryable)
unexpected_error   any other exception while preparing the record (message in ``detail``)
================== ==================================================================================
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Dict, Iterable

# Rejections caused by the machine rather than the data: a chunk holding one is not committed as final, so the
# next run with the same arguments retries it.
RETRYABLE_REASONS = frozenset({"worker_crash", "timeout", "shard_io_error"})


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
