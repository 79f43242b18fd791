"""Reading an image file named by an annotation without leaving its root, blocking, or reading without bound.

Before a single byte is read, :func:`read_image_file` resolves the path (symbolic links included) and requires
it to lie inside the image root (``unsafe_path``), to be a regular file (``not_regular_file``: no device, pipe,
socket or folder) and to be at most ``max_bytes`` long (``image_too_large``). The file is opened with
``O_NONBLOCK | O_NOFOLLOW`` (a pipe swapped in after the check cannot block) and checked again on the open
descriptor; at most ``max_bytes + 1`` bytes are read. See ``docs/design.md#preprocessing-failure-classes``.
"""
from __future__ import annotations

import os
import stat
from typing import Sequence

from libra_megatron.data.samples import SampleError

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def inside_root(path: str, root: str) -> str:
    """The resolved ``path``; raises ``unsafe_path`` when it (after symbolic links) is not inside ``root``."""
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(path)
    if os.path.commonpath([real_root, resolved]) != real_root:
        raise SampleError("unsafe_path", f"{path}: resolves to {resolved}, outside the image root {real_root}")
    return resolved


def _check_regular(path: str, info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a named pipe" if stat.S_ISFIFO(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
        raise SampleError("not_regular_file", f"{path}: {kind}, not a regular file")
    if info.st_size > max_bytes:
        raise SampleError("image_too_large", f"{path}: {info.st_size} bytes > --max-image-bytes {max_bytes}")


def read_image_file(paths: Sequence[str], root: str, max_bytes: int) -> bytes:
    """The bytes of the first existing candidate path (each checked as above); ``missing_image`` if none exists."""
    for path in paths:
        resolved = inside_root(path, root)
        try:
            info = os.stat(resolved)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SampleError("unreadable_image", f"{path}: {exc.strerror or exc}") from exc
        _check_regular(path, info, max_bytes)
        try:
            fd = os.open(resolved, _OPEN_FLAGS)
        except OSError as exc:
            raise SampleError("unreadable_image", f"{path}: {exc.strerror or exc}") from exc
        try:
            info = os.fstat(fd)
            _check_regular(path, info, max_bytes)  # the file that was opened, not the one stat saw
            chunks, total = [], 0
            while total <= max_bytes:  # the known size (+1 byte to see growth); a read may return less
                want = info.st_size + 1 - total if total <= info.st_size else min(1 << 20, max_bytes + 1 - total)
                chunk = os.read(fd, want)
                if not chunk:  # end of file (only an empty read is the end)
                    break
                chunks.append(chunk)
                total += len(chunk)
        except OSError as exc:
            raise SampleError("unreadable_image", f"{path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise SampleError("image_too_large", f"{path}: grew above --max-image-bytes {max_bytes} while read")
        return data
    raise SampleError("missing_image", f"file not found: {paths[0]}" if paths else "the record names no image")
