"""Byte-level reading of annotation files (captions ``.jsonl`` / ``.csv``, COCO-Karpathy and LLaVA ``.json``).

Files are read as bytes and decoded line by line with ``utf-8-sig`` (a BOM is dropped), so one undecodable
line becomes one ``bad_record`` naming the file and line instead of aborting the job. A JSON document (a list of
entries) is decoded with ``surrogateescape`` and parsed entry by entry, so each entry knows its line and an entry
holding bytes that are not UTF-8 is rejected alone.
"""
from __future__ import annotations

import csv
import json
from typing import Any, Iterator, List, Optional, Tuple

BOM = b"\xef\xbb\xbf"


def _surrogates(value: Any) -> bool:
    """True when a decoded JSON value holds a string with undecodable bytes (surrogate escapes)."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_surrogates(k) or _surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_surrogates(v) for v in value)
    return False


def decoded_lines(path: str) -> Iterator[Tuple[int, Optional[str], Optional[str]]]:
    """``(line number, text, error)`` per line of a text file; ``text`` is ``None`` when the line is not UTF-8."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ValueError(f"cannot read annotation file {path!r}: {exc.strerror or exc}") from exc
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8-sig"), None
            except UnicodeDecodeError as exc:
                yield number, None, f"line {number}: not UTF-8 ({exc.reason} at byte {exc.start})"


def jsonl_rows(path: str) -> Iterator[Tuple[int, Optional[dict], Optional[str]]]:
    """``(line, object, error)`` per non-blank line of a JSON-lines file."""
    for number, text, error in decoded_lines(path):
        if error is None and not text.strip():
            continue
        if error is None:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                error = f"line {number}: invalid JSON ({exc})"
            else:
                if isinstance(row, dict):
                    yield number, row, None
                    continue
                error = f"line {number}: a JSON {type(row).__name__}, not an object"
        yield number, None, error


def csv_rows(path: str, required: List[str]) -> Iterator[Tuple[int, Optional[dict], Optional[str]]]:
    """``(line, row, error)`` per record of a CSV file with a header holding the ``required`` columns."""
    errors: List[Tuple[int, str]] = []
    line_of_next: List[int] = []

    def good_lines() -> Iterator[str]:
        for number, text, error in decoded_lines(path):
            if error is not None:
                if not line_of_next:  # the first line is the header: without it every column would shift
                    raise ValueError(f"{path}: line {number}: the CSV header is not UTF-8")
                errors.append((number, error))
                continue
            line_of_next.append(number)
            yield text

    reader = csv.reader(good_lines())
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{path}: empty CSV file (no header)") from None
    except csv.Error as exc:
        raise ValueError(f"{path}: line 1: bad CSV header ({exc})") from exc
    missing = sorted(set(required) - set(header))
    if missing:
        raise ValueError(f"{path}: CSV header lacks column(s) {missing} (has {header})")
    while True:
        start = len(line_of_next)
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield line_of_next[start] if start < len(line_of_next) else 0, None, f"bad CSV ({exc})"
            continue
        while errors:
            number, error = errors.pop(0)
            yield number, None, error
        number = line_of_next[start] if start < len(line_of_next) else line_of_next[-1]
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            yield number, None, f"line {number}: {len(fields)} fields, the header has {len(header)}"
            continue
        yield number, dict(zip(header, fields)), None
    for number, error in errors:
        yield number, None, error


def json_entries(path: str) -> List[Tuple[int, Any, Optional[str]]]:
    """``(line, entry, error)`` per element of a JSON file holding one list; ``error`` for an entry with bytes
    that are not UTF-8. A file that is not one JSON list raises ``ValueError`` naming the file and line."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ValueError(f"cannot read annotation file {path!r}: {exc.strerror or exc}") from exc
    if data.startswith(BOM):
        data = data[len(BOM):]
    text = data.decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    position, end = _skip_space(text, 0), len(text)
    if position >= end or text[position] != "[":
        raise ValueError(f"{path}: expected a JSON list of entries")
    entries: List[Tuple[int, Any, Optional[str]]] = []
    line, counted = 1, 0
    position = _skip_space(text, position + 1)
    if position < end and text[position] == "]":
        return entries
    while True:
        line += text.count("\n", counted, position)
        counted = position
        try:
            entry, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            bad_line = line + text.count("\n", counted, exc.pos)
            raise ValueError(f"cannot read annotation file {path!r}: invalid JSON at line {bad_line} ({exc.msg})") from exc
        error = f"line {line}: entry holds bytes that are not UTF-8" if _surrogates(entry) else None
        entries.append((line, entry, error))
        position = _skip_space(text, position)
        if position < end and text[position] == ",":
            position = _skip_space(text, position + 1)
            continue
        if position < end and text[position] == "]":
            if _skip_space(text, position + 1) != end:
                raise ValueError(f"{path}: data after the closing ']'")
            return entries
        raise ValueError(f"cannot read annotation file {path!r}: expected ',' or ']' at line "
                         f"{line + text.count(chr(10), counted, position)}")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
