"""Streaming reader of one webdataset tar shard (plain or compressed) that can neither merge, drop nor escape.

A sample is the run of consecutive members sharing a key (the path up to the first dot of the basename). The
reader guarantees, for every shard (see ``docs/design.md#preprocessing-failure-classes``):

- a key used twice in a shard is never merged: a run that repeats an extension (``a.jpg a.json a.png a.json``)
  is two samples, and every sample of a key that occurs more than once is rejected as ``duplicate_key`` (a
  key seen earlier in the shard and already passed on keeps that first sample; the later ones are rejected);
- a member that escapes the archive (absolute, ``..``, link, device) rejects its sample (``unsafe_member_path``);
  a member above ``max_member_bytes`` rejects its sample (``image_too_large``) without being read;
- the shard must end with its end-of-archive marker (a zero block). A shard cut inside a member rejects that
  sample as ``truncated_shard``; a shard cut at a header or member boundary (or ending in garbage) keeps every
  complete sample and reports its tail as ``truncated_shard`` naming the last good key. A read error (also of a
  gzip stream) keeps every complete sample before it;
- an I/O error of the file system (``OSError`` while opening or reading the shard: permissions, EIO, a vanished
  network mount) is not a property of the data: it is reported as ``shard_io_error``, a *retryable* reason, so the
  chunk is not committed as final and the next run reads the shard again.
"""
from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

from libra_megatron.data.records import IMAGE_EXTENSIONS, RawRecord
from libra_megatron.data.rejects import Rejected

_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset: key = path up to the first dot of the basename
_READ_ERRORS = (OSError, tarfile.TarError, EOFError, ValueError)  # zlib.error is re-raised by tarfile as ReadError


class _EndMarkerTarInfo(tarfile.TarInfo):
    """TarInfo that records on its TarFile how the header read ended (tarfile ends every bad tail silently)."""

    @classmethod
    def fromtarfile(cls, archive):  # noqa: D102 - tarfile's own hook
        try:
            info = super().fromtarfile(archive)
        except tarfile.HeaderError as exc:
            archive.libra_header_end = type(exc).__name__
            raise
        archive.libra_header_end = None
        return info


@dataclass
class _Sample:
    """Members of one sample (one run of a key) while the shard is read."""

    key: str
    members: Dict[str, Tuple[str, bytes]] = field(default_factory=dict)
    problem: Optional[Tuple[str, str]] = None  # (reason, detail) of the first problem member


def unsafe_member(member: tarfile.TarInfo) -> Optional[str]:
    """Why a tar member may not be read (absolute path, ``..``, link, not a regular file), or ``None``."""
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


def _sample_record(shard: str, sample: _Sample) -> Union[RawRecord, Rejected]:
    """The raw record of a complete sample, or its rejection."""
    key, members = sample.key, sample.members
    if sample.problem:
        return Rejected(shard, key, *sample.problem)
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        return Rejected(shard, key, "missing_image", f"no image member among {sorted(members)}")
    record = RawRecord(source=shard, key=key, kind="pretrain")
    record.image_name, record.image_bytes = members[image_ext]
    if "json" in members:
        name, data = members["json"]
        try:
            meta = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Rejected(shard, key, "bad_record", f"{name}: invalid JSON ({exc})")
        if not isinstance(meta, dict):
            return Rejected(shard, key, "bad_record", f"{name}: a {type(meta).__name__}, not a JSON object")
        if meta.get("caption") is not None:  # null is absent (as in the annotation formats): .txt, else missing
            if not isinstance(meta["caption"], str):
                return Rejected(shard, key, "bad_record",
                                f"{name}: field 'caption' is a {type(meta['caption']).__name__}, not text")
            record.caption = meta["caption"]
    if record.caption is None and "txt" in members:
        try:
            record.caption = members["txt"][1].decode("utf-8-sig")
        except UnicodeDecodeError:
            record.caption_error = f"{members['txt'][0]} is not UTF-8"
    return record


class _ShardReader:
    """State of one pass over a shard: the current run of samples with one key and the keys already passed."""

    def __init__(self, shard: str, max_member_bytes: int):
        self.shard, self.max_member_bytes = shard, max_member_bytes
        self.run: List[_Sample] = []  # consecutive samples with the same key (more than one: duplicates)
        self.passed: Dict[str, int] = {}  # key -> number of samples of it already flushed
        self.last_good: Optional[str] = None  # key of the last sample flushed as a record

    def flush(self) -> Iterator[Union[RawRecord, Rejected]]:
        """Emit the current run: one sample -> its record; several, or a key seen before -> ``duplicate_key``."""
        run, self.run = self.run, []
        if not run:
            return
        key = run[0].key
        earlier = self.passed.get(key, 0)
        self.passed[key] = earlier + len(run)
        if len(run) == 1 and earlier == 0:
            item = _sample_record(self.shard, run[0])
            if isinstance(item, RawRecord):
                self.last_good = key
            yield item
            return
        for number, _ in enumerate(run, start=earlier + 1):
            where = ("an earlier sample of this shard has the same key (the first one is kept)" if earlier
                     else f"the key occurs {len(run)} times in a row")
            yield Rejected(self.shard, key, "duplicate_key", f"sample #{number} of key {key!r}: {where}; "
                                                             "duplicate samples are never merged")

    def tail_lost(self, why: str) -> Rejected:
        """The report of a shard whose end is missing or unreadable."""
        last = self.last_good
        after = f"after the last good key {last!r}" if last is not None else "before any good sample"
        return Rejected(self.shard, last or "", "truncated_shard", f"{why} {after}; the rest of the shard is lost")

    def io_error(self, what: str, exc: OSError) -> Rejected:
        """The retryable report of an I/O error of the file system (the next run reads the shard again)."""
        return Rejected(self.shard, self.last_good or "", "shard_io_error",
                        f"{what} ({type(exc).__name__}: {exc}) after the last good key {self.last_good!r}; "
                        "a rerun retries this shard")

    def read(self) -> Iterator[Union[RawRecord, Rejected]]:
        """Every sample of the shard in order, then the tail report when the shard does not end properly."""
        try:
            archive = tarfile.open(self.shard, mode="r|*", tarinfo=_EndMarkerTarInfo)
        except OSError as exc:
            yield self.io_error("cannot open", exc)
            return
        except _READ_ERRORS as exc:
            yield Rejected(self.shard, "", "unreadable_shard", f"cannot open: {exc}")
            return
        with archive:
            members = iter(archive)
            while True:
                try:
                    member = next(members)
                except StopIteration:
                    break
                except OSError as exc:
                    yield from self.flush()
                    yield self.io_error("read error", exc)
                    return
                except _READ_ERRORS as exc:  # a bad next header / compressed stream: the run so far is complete
                    yield from self.flush()
                    yield self.tail_lost(f"read error ({type(exc).__name__}: {exc})")
                    return
                try:
                    self.add(archive, member)
                except OSError as exc:
                    self.run.pop()
                    yield from self.flush()
                    yield self.io_error(f"read error in member {member.name!r}", exc)
                    return
                except _READ_ERRORS as exc:  # the data of this member ends early: its sample is incomplete
                    broken = self.run.pop()
                    yield from self.flush()
                    yield Rejected(self.shard, broken.key, "truncated_shard",
                                   f"the shard ends inside member {member.name!r} ({type(exc).__name__}: {exc}); "
                                   f"last good key {self.last_good!r}; the rest of the shard is lost")
                    return
                if len(self.run) > 1 and self.run[-2].key != self.run[-1].key:
                    current = self.run.pop()
                    yield from self.flush()
                    self.run = [current]
            yield from self.flush()
            end = getattr(archive, "libra_header_end", "EmptyHeaderError")
            if end != "EOFHeaderError":
                what = {"EmptyHeaderError": "the shard ends without its end-of-archive marker",
                        "TruncatedHeaderError": "the shard ends inside a tar header",
                        "InvalidHeaderError": "the shard ends in data that is not a tar header"}
                yield self.tail_lost(what.get(end, f"the shard ends abnormally ({end})"))

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Put one member into the current run (starting a new sample on a new key or a repeated extension)."""
        if member.isdir():
            return
        name = member.name
        match = _WDS_KEY.match(name)
        key = match.group(1) if match else name
        ext = match.group(2).lower() if match else None
        current = self.run[-1] if self.run else None
        if current is None or current.key != key or (ext is not None and ext in current.members):
            current = _Sample(key)
            self.run.append(current)
        problem = unsafe_member(member)
        if problem:
            current.problem = current.problem or ("unsafe_member_path", f"{name!r}: {problem}")
            return
        if match is None:
            return
        if member.size > self.max_member_bytes:  # never read: the stream skips it
            current.problem = current.problem or (
                "image_too_large", f"{name!r}: {member.size} bytes > --max-image-bytes {self.max_member_bytes}")
            current.members[ext] = (name, b"")
            return
        handle = archive.extractfile(member)
        data = handle.read() if handle else b""
        if len(data) != member.size:
            raise tarfile.ReadError(f"member data ends after {len(data)} of {member.size} bytes")
        current.members[ext] = (name, data)


def read_shard(shard: str, max_member_bytes: int) -> Iterator[Union[RawRecord, Rejected]]:
    """The records (and rejections) of one webdataset shard, in member order."""
    yield from _ShardReader(shard, max_member_bytes).read()
