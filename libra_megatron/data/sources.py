"""Readers of the raw corpora: webdataset tar shards, image folder + captions jsonl/csv, COCO-Karpathy json,
LLaVA instruction json. Each splits its input into numbered *chunks* (a tar shard, or ``chunk_size``
annotation records) — the unit of work, of rank assignment and of atomic output — and yields the raw records
of a chunk in a fixed order (or :class:`~libra_megatron.data.rejects.Rejected` entries for what it cannot
read). Nothing here decodes images; that happens in the workers (:mod:`libra_megatron.data.preprocess_worker`).
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from libra_megatron.data.rejects import Rejected

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset: key = path up to the first dot of the basename


@dataclass
class RawRecord:
    """One input sample before decoding: where it is from, its image (bytes or a path) and its text."""

    source: str
    key: str
    kind: str  # "pretrain" (image + caption) or "instruct" (conversation, optional image)
    image_name: Optional[str] = None  # file or member name (for the extension check)
    image_bytes: Optional[bytes] = None
    image_paths: Sequence[str] = ()  # candidate paths, tried in order (LLaVA's '-' -> '_' retry)
    caption: Optional[str] = None
    caption_error: Optional[str] = None  # a caption that exists but could not be read (reason code)
    conversations: Optional[List[Dict[str, Any]]] = None
    has_image: bool = True


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

    def __init__(self, shards: Sequence[str]):
        self.shards = list(shards)

    def describe(self) -> Dict[str, Any]:
        return {"format": "webdataset", "inputs": self.shards}

    def chunks(self) -> List[Chunk]:
        return [Chunk(i, shard) for i, shard in enumerate(self.shards)]

    def read(self, chunk: Chunk) -> Iterator[Item]:
        shard = chunk.source
        try:
            archive = tarfile.open(shard, mode="r|*")
        except (OSError, tarfile.TarError, EOFError) as exc:
            yield Rejected(shard, "", "unreadable_shard", f"cannot open: {exc}")
            return
        key, members, unsafe = None, {}, None
        try:
            with archive:
                for member in archive:
                    name = member.name
                    if member.isdir():
                        continue
                    match = _WDS_KEY.match(name)
                    member_key = match.group(1) if match else name
                    if member_key != key:
                        if key is not None:
                            yield self._record(shard, key, members, unsafe)
                        key, members, unsafe = member_key, {}, None
                    problem = _unsafe_member(member)
                    if problem:
                        unsafe = unsafe or f"{name!r}: {problem}"
                        continue
                    if match is None:
                        continue
                    handle = archive.extractfile(member)
                    members[match.group(2).lower()] = (name, handle.read() if handle else b"")
                if key is not None:
                    yield self._record(shard, key, members, unsafe)
        except (OSError, tarfile.TarError, EOFError) as exc:
            yield Rejected(shard, key or "", "unreadable_shard", f"read error after key {key!r}: {exc}")

    @staticmethod
    def _record(shard: str, key: str, members: Dict[str, tuple], unsafe: Optional[str]) -> Item:
        if unsafe:
            return Rejected(shard, key, "unsafe_member_path", unsafe)
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image_ext is None:
            return Rejected(shard, key, "missing_image", f"no image member among {sorted(members)}")
        record = RawRecord(source=shard, key=key, kind="pretrain")
        record.image_name, record.image_bytes = members[image_ext]
        if "json" in members:
            try:
                meta = json.loads(members["json"][1].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return Rejected(shard, key, "bad_record", f"{members['json'][0]}: invalid JSON ({exc})")
            if isinstance(meta, dict) and "caption" in meta:
                record.caption = meta["caption"]
        if record.caption is None and "txt" in members:
            try:
                record.caption = members["txt"][1].decode("utf-8")
            except UnicodeDecodeError:
                record.caption_error = f"{members['txt'][0]} is not UTF-8"
        return record


def _unsafe_member(member: tarfile.TarInfo) -> Optional[str]:
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "path escapes the archive ('..')"
    if member.issym() or member.islnk():
        return "link member"
    if not member.isfile():
        return "not a regular file"
    return None


class _AnnotationSource:
    """Shared chunking of annotation-file sources (records are parsed once per process)."""

    kind = "pretrain"

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

    def _load_json(self) -> Any:
        try:
            with open(self.path, "r", encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read annotation file {self.path!r}: {exc}") from exc

    def _parse(self) -> Iterator[Item]:
        raise NotImplementedError


class CaptionFileSource(_AnnotationSource):
    """An image folder with a captions file: ``.jsonl`` (one object per line) or ``.csv`` (with a header)."""

    format = "image-folder"

    def __init__(self, path: str, image_root: Optional[str], chunk_size: int,
                 image_key: str = "image", caption_key: str = "caption"):
        super().__init__(path, image_root, chunk_size)
        self.image_key, self.caption_key = image_key, caption_key

    def _parse(self) -> Iterator[Item]:
        try:
            handle = open(self.path, "r", encoding="utf-8", newline="")
        except OSError as exc:
            raise ValueError(f"cannot read captions file {self.path!r}: {exc}") from exc
        with handle:
            if self.path.lower().endswith(".csv"):
                reader = csv.DictReader(handle)
                missing = {self.image_key, self.caption_key} - set(reader.fieldnames or ())
                if missing:
                    raise ValueError(f"{self.path}: CSV header lacks column(s) {sorted(missing)}")
                rows = ((f"row{n + 2}", row, None) for n, row in enumerate(reader))
            else:
                rows = (self._json_line(n, line) for n, line in enumerate(handle) if line.strip())
            for key, row, error in rows:
                if error:
                    yield Rejected(self.path, key, "bad_record", error)
                elif not isinstance(row.get(self.image_key), str) or not row[self.image_key]:
                    yield Rejected(self.path, key, "missing_image", f"no '{self.image_key}' field")
                else:
                    yield RawRecord(source=self.path, key=key, kind="pretrain", image_name=row[self.image_key],
                                    image_paths=(self.image_path(row[self.image_key]),),
                                    caption=row.get(self.caption_key))

    @staticmethod
    def _json_line(index: int, line: str):
        key = f"line{index + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return key, None, f"invalid JSON: {exc}"
        if not isinstance(row, dict):
            return key, None, "line is not a JSON object"
        return key, row, None


class CocoKarpathySource(_AnnotationSource):
    """COCO-Karpathy caption json: ``[{"image": ..., "caption": str | [str, ...]}, ...]`` (one sample per caption)."""

    format = "coco-karpathy"

    def _parse(self) -> Iterator[Item]:
        entries = self._load_json()
        if not isinstance(entries, list):
            raise ValueError(f"{self.path}: expected a JSON list of {{image, caption}} entries")
        for index, entry in enumerate(entries):
            key = str(index)
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                yield Rejected(self.path, key, "bad_record" if not isinstance(entry, dict) else "missing_image",
                               "entry needs an 'image' path")
                continue
            captions = entry.get("caption")
            captions = captions if isinstance(captions, list) else [captions]
            for j, caption in enumerate(captions):
                yield RawRecord(source=self.path, key=key if len(captions) == 1 else f"{key}.{j}", kind="pretrain",
                                image_name=entry["image"], image_paths=(self.image_path(entry["image"]),),
                                caption=caption)


class LlavaSource(_AnnotationSource):
    """LLaVA instruction json: ``[{"id", "image"?, "conversations": [{"from", "value"}, ...]}, ...]``."""

    format = "llava"
    kind = "instruct"

    def _parse(self) -> Iterator[Item]:
        entries = self._load_json()
        if not isinstance(entries, list):
            raise ValueError(f"{self.path}: expected a JSON list of conversation entries")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                yield Rejected(self.path, str(index), "bad_record", "entry is not an object")
                continue
            key = str(entry.get("id", index))
            image = entry.get("image")
            if image is not None and not isinstance(image, str):
                yield Rejected(self.path, key, "bad_record", "'image' must be one path")
                continue
            record = RawRecord(source=self.path, key=key, kind="instruct", conversations=entry.get("conversations"),
                               has_image=image is not None, image_name=image)
            if image is not None:
                path = self.image_path(image)
                directory, name = os.path.split(path)
                alternative = os.path.join(directory, name.replace("-", "_"))
                record.image_paths = (path,) if alternative == path else (path, alternative)
            yield record


def build_source(input_format: str, inputs: Sequence[str], image_root: Optional[str] = None,
                 chunk_size: int = 1000, image_key: str = "image", caption_key: str = "caption"):
    """The reader for ``--input-format`` (webdataset, image-folder, coco-karpathy, llava)."""
    paths = expand_inputs(inputs)
    if input_format == "webdataset":
        return WebDatasetSource(paths)
    if len(paths) != 1:
        raise ValueError(f"--input-format {input_format} takes exactly one annotation file, got {len(paths)}")
    if input_format == "image-folder":
        return CaptionFileSource(paths[0], image_root, chunk_size, image_key, caption_key)
    if input_format == "coco-karpathy":
        return CocoKarpathySource(paths[0], image_root, chunk_size)
    if input_format == "llava":
        return LlavaSource(paths[0], image_root, chunk_size)
    raise ValueError(f"unknown --input-format {input_format!r}")

