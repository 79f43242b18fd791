"""Readers of the raw corpora: webdataset tar shards, image folder + captions jsonl/csv, COCO-Karpathy json,
LLaVA instruction json. Each splits its input into numbered *chunks* (a tar shard, or ``chunk_size``
annotation records) — the unit of work, of rank assignment and of atomic output — and yields the raw records
of a chunk in a fixed order (or :class:`~libra_megatron.data.rejects.Rejected` entries for what it cannot
read). Nothing here decodes images or opens them; that happens in the workers (:mod:`libra_megatron.data.preprocess_worker`,
through :mod:`libra_megatron.data.safe_read`). Annotation files are decoded line by line
(:mod:`libra_megatron.data.annotations`); fields of the wrong type are ``bad_record`` with file and line.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from libra_megatron.data.annotations import csv_rows, json_entries, jsonl_rows
from libra_megatron.data.records import DEFAULT_MAX_IMAGE_BYTES, IMAGE_EXTENSIONS, RawRecord
from libra_megatron.data.rejects import Rejected
from libra_megatron.data.webdataset import read_shard

__all__ = ["IMAGE_EXTENSIONS", "RawRecord", "Chunk", "Item", "build_source", "expand_inputs"]


@dataclass(frozen=True)
class Chunk:
    """A unit of work: ``chunk_id`` is global (independent of rank and world size)."""

    chunk_id: int
    source: str
    start: int = 0
    stop: int = 0


Item = Union[RawRecord, Rejected]


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Paths from arguments: globs are expanded and sorted; plain paths keep the order given."""
    paths: List[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"input pattern {pattern!r} matches no file")
            paths.extend(matches)
        else:
            paths.append(pattern)
    return paths


class WebDatasetSource:
    """Webdataset tar shards (Libra's LAION layout: ``KEY.jpg`` + ``KEY.json`` with ``caption`` or ``KEY.txt``)."""

    kind = "pretrain"

    def __init__(self, shards: Sequence[str], max_member_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.shards = list(shards)
        self.max_member_bytes = max_member_bytes

    def describe(self) -> Dict[str, Any]:
        """The input part of the resume fingerprint (and of the sidecar's ``inputs``)."""
        return {"format": "webdataset", "inputs": self.shards}

    def chunks(self) -> List[Chunk]:
        """One chunk per shard, numbered in argument order."""
        return [Chunk(i, shard) for i, shard in enumerate(self.shards)]

    def read(self, chunk: Chunk) -> Iterator[Item]:
        """The records (and rejections) of one shard, in member order."""
        yield from read_shard(chunk.source, self.max_member_bytes)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _AnnotationSource:
    """Shared chunking of annotation-file sources (records are parsed once per process)."""

    kind = "pretrain"
    format = ""

    def __init__(self, path: str, image_root: Optional[str], chunk_size: int):
        if chunk_size <= 0:
            raise ValueError(f"--chunk-size must be > 0, got {chunk_size}")
        self.path = path
        self.image_root = image_root or os.path.dirname(os.path.abspath(path))
        self.chunk_size = chunk_size
        self._records: Optional[List[Item]] = None

    def describe(self) -> Dict[str, Any]:
        return {"format": self.format, "inputs": [self.path], "image_root": self.image_root,
                "chunk_size": self.chunk_size}

    @property
    def records(self) -> List[Item]:
        if self._records is None:
            self._records = list(self._parse())
        return self._records

    def chunks(self) -> List[Chunk]:
        total = len(self.records)
        return [Chunk(i, self.path, start, min(start + self.chunk_size, total))
                for i, start in enumerate(range(0, total, self.chunk_size))]

    def read(self, chunk: Chunk) -> Iterator[Item]:
        yield from self.records[chunk.start : chunk.stop]

    def image_path(self, relative: str) -> str:
        return os.path.join(self.image_root, relative)

    def bad(self, key: str, line: int, detail: str) -> Rejected:
        where = "" if detail.startswith("line ") else f"line {line}: "
        return Rejected(self.path, key, "bad_record", where + detail)

    def _parse(self) -> Iterator[Item]:
        raise NotImplementedError


class CaptionFileSource(_AnnotationSource):
    """An image folder with a captions file: ``.jsonl`` (one object per line) or ``.csv`` (with a header)."""

    format = "image-folder"

    def __init__(self, path: str, image_root: Optional[str], chunk_size: int,
                 image_key: str = "image", caption_key: str = "caption"):
        super().__init__(path, image_root, chunk_size)
        self.image_key, self.caption_key = image_key, caption_key

    def describe(self) -> Dict[str, Any]:
        """The resume fingerprint of the input, the column/field names included."""
        return dict(super().describe(), image_key=self.image_key, caption_key=self.caption_key)

    def _parse(self) -> Iterator[Item]:
        if self.path.lower().endswith(".csv"):
            rows, prefix = csv_rows(self.path, [self.image_key, self.caption_key]), "row"
        else:
            rows, prefix = jsonl_rows(self.path), "line"
        for line, row, error in rows:
            key = f"{prefix}{line}"
            if error:
                yield self.bad(key, line, error)
                continue
            image, caption = row.get(self.image_key), row.get(self.caption_key)
            if image is None or image == "":
                yield Rejected(self.path, key, "missing_image", f"line {line}: no '{self.image_key}' field")
            elif not isinstance(image, str):
                yield self.bad(key, line, f"field '{self.image_key}' is a {_type_name(image)}, not a path")
            elif caption is not None and not isinstance(caption, str):
                yield self.bad(key, line, f"field '{self.caption_key}' is a {_type_name(caption)}, not text")
            else:
                yield RawRecord(source=self.path, key=key, kind="pretrain", image_name=image,
                                image_paths=(self.image_path(image),), image_root=self.image_root, caption=caption,
                                line=line)


class CocoKarpathySource(_AnnotationSource):
    """COCO-Karpathy caption json: ``[{"image": ..., "caption": str | [str, ...]}, ...]`` (one sample per caption)."""

    format = "coco-karpathy"

    def _parse(self) -> Iterator[Item]:
        for index, (line, entry, error) in enumerate(json_entries(self.path)):
            key = str(index)
            if error:
                yield self.bad(key, line, error)
                continue
            if not isinstance(entry, dict):
                yield self.bad(key, line, f"entry is a {_type_name(entry)}, not an object")
                continue
            image = entry.get("image")
            if image is None or image == "":
                yield Rejected(self.path, key, "missing_image", f"line {line}: entry needs an 'image' path")
                continue
            if not isinstance(image, str):
                yield self.bad(key, line, f"field 'image' is a {_type_name(image)}, not a path")
                continue
            captions = entry.get("caption")
            if captions == []:
                yield Rejected(self.path, key, "missing_caption", f"line {line}: empty 'caption' list")
                continue
            captions = captions if isinstance(captions, list) else [captions]
            for j, caption in enumerate(captions):
                caption_key = key if len(captions) == 1 else f"{key}.{j}"
                if caption is not None and not isinstance(caption, str):
                    yield self.bad(caption_key, line, f"caption is a {_type_name(caption)}, not text")
                    continue
                yield RawRecord(source=self.path, key=caption_key, kind="pretrain", image_name=image,
                                image_paths=(self.image_path(image),), image_root=self.image_root, caption=caption,
                                line=line)


def _conversation_type_error(conversations: Any) -> Optional[str]:
    """Why ``conversations`` has the wrong shape of types (a list of objects with text fields), or ``None``."""
    if conversations is None:
        return None  # missing: a bad_conversation for the sample rules
    if not isinstance(conversations, list):
        return f"field 'conversations' is a {_type_name(conversations)}, not a list"
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            return f"conversation turn {index} is a {_type_name(turn)}, not an object"
        for name in ("from", "value"):
            if name in turn and not isinstance(turn[name], str):
                return f"conversation turn {index}: '{name}' is a {_type_name(turn[name])}, not text"
    return None


class LlavaSource(_AnnotationSource):
    """LLaVA instruction json: ``[{"id", "image"?, "conversations": [{"from", "value"}, ...]}, ...]``."""

    format = "llava"
    kind = "instruct"

    def _parse(self) -> Iterator[Item]:
        for index, (line, entry, error) in enumerate(json_entries(self.path)):
            if not isinstance(entry, dict):
                yield self.bad(str(index), line, error or f"entry is a {_type_name(entry)}, not an object")
                continue
            entry_id = entry.get("id", index)
            id_ok = isinstance(entry_id, (str, int)) and not isinstance(entry_id, bool)
            key = str(entry_id) if id_ok else str(index)
            if error:
                yield self.bad(key, line, error)
                continue
            image = entry.get("image")
            problem = (f"field 'id' is a {_type_name(entry_id)}, not text or a number" if not id_ok else
                       f"field 'image' is a {_type_name(image)}, not one path"
                       if image is not None and not isinstance(image, str) else
                       _conversation_type_error(entry.get("conversations")))
            if problem:
                yield self.bad(key, line, problem)
                continue
            record = RawRecord(source=self.path, key=key, kind="instruct", conversations=entry.get("conversations"),
                               has_image=image is not None, image_name=image, image_root=self.image_root, line=line)
            if image is not None:
                path = self.image_path(image)
                directory, name = os.path.split(path)
                alternative = os.path.join(directory, name.replace("-", "_"))
                record.image_paths = (path,) if alternative == path else (path, alternative)
            yield record


def build_source(input_format: str, inputs: Sequence[str], image_root: Optional[str] = None,
                 chunk_size: int = 1000, image_key: str = "image", caption_key: str = "caption",
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Union[WebDatasetSource, _AnnotationSource]:
    """The reader for ``--input-format`` (webdataset, image-folder, coco-karpathy, llava). A webdataset shard that
    does not exist (or a glob matching no file) raises ``FileNotFoundError``: it is a wrong argument, not a reject."""
    paths = expand_inputs(inputs)
    if input_format == "webdataset":
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--input: webdataset shard not found (or not a file): {path}")
        return WebDatasetSource(paths, max_image_bytes)
    if len(paths) != 1:
        raise ValueError(f"--input-format {input_format} takes exactly one annotation file, got {len(paths)}")
    if input_format == "image-folder":
        return CaptionFileSource(paths[0], image_root, chunk_size, image_key, caption_key)
    if input_format == "coco-karpathy":
        return CocoKarpathySource(paths[0], image_root, chunk_size)
    if input_format == "llava":
        return LlavaSource(paths[0], image_root, chunk_size)
    raise ValueError(f"unknown --input-format {input_format!r}")
