"""Atomic per-chunk part files of the preprocessing job, exact resume, and the merge into one dataset.

``PREFIX.parts/`` holds, per finished chunk ``c``: ``chunk-{c:08d}.bin``, ``.idx`` and ``.json`` (counts,
rejects, sizes, settings fingerprint). A chunk is written under temporary names, fsynced, renamed, and its
``.json`` is renamed last: the ``.json`` is the commit marker. A killed job, rerun with the same arguments,
skips committed chunks and redoes the others from scratch, so the merged dataset is byte-identical to that of
an uninterrupted run. ``manifest.json`` pins the settings fingerprint; a rerun with different settings is
refused. The merge concatenates the parts in chunk order (so the result does not depend on ``--world-size``
or ``--workers``) and writes ``PREFIX.bin``, ``PREFIX.idx``, ``PREFIX.rejects.jsonl`` and, last,
``PREFIX.json``.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from libra_megatron.data.indexed import SampleWriter, merge_indexed
from libra_megatron.data.rejects import RETRYABLE_REASONS, count_by_reason
from libra_megatron.data.sidecar import atomic_write_json, sidecar_path
from libra_megatron.vocab import LibraVocab


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartStore:
    """The ``PREFIX.parts`` folder of one output prefix."""

    def __init__(self, output_prefix: str):
        self.output_prefix = output_prefix
        self.directory = output_prefix + ".parts"

    def part_prefix(self, chunk_id: int) -> str:
        """``PREFIX.parts/chunk-{chunk_id:08d}`` (add ``.bin`` / ``.idx`` / ``.json``)."""
        return os.path.join(self.directory, f"chunk-{chunk_id:08d}")

    def _tmp_prefix(self, chunk_id: int) -> str:
        return os.path.join(self.directory, f".tmp-chunk-{chunk_id:08d}")

    def prepare(self, fingerprint: Dict[str, Any], chunk_ids: Sequence[int]) -> None:
        """Create the folder, check or write ``manifest.json``, remove leftovers of this rank's chunks."""
        os.makedirs(self.directory, exist_ok=True)
        manifest = os.path.join(self.directory, "manifest.json")
        if os.path.exists(manifest):
            with open(manifest, "r", encoding="utf-8") as handle:
                existing = json.load(handle)
            if existing != fingerprint:
                changed = sorted(k for k in set(existing) | set(fingerprint) if existing.get(k) != fingerprint.get(k))
                raise ValueError(
                    f"{self.directory} was written with different settings (changed: {changed}); rerun with the "
                    f"original arguments, or delete {self.directory} to start over"
                )
        else:
            atomic_write_json(manifest, fingerprint)
        mine = set(chunk_ids)
        for name in os.listdir(self.directory):
            match = re.match(r"^(?:\.tmp-chunk-(\d+)\.(?:bin|idx)|chunk-(\d+)\.json\.tmp-\d+)$", name)
            if match and int(match.group(1) or match.group(2)) in mine:
                os.remove(os.path.join(self.directory, name))

    def chunk_record(self, chunk_id: int) -> Optional[Dict[str, Any]]:
        """The committed ``.json`` of a chunk if the chunk is complete and intact, else ``None``."""
        prefix = self.part_prefix(chunk_id)
        try:
            with open(prefix + ".json", "r", encoding="utf-8") as handle:
                record = json.load(handle)
            if (os.path.getsize(prefix + ".bin") != record["bin_bytes"]
                    or os.path.getsize(prefix + ".idx") != record["idx_bytes"]):
                return None
            return record
        except (OSError, ValueError, KeyError):
            return None

    def is_final(self, chunk_id: int) -> bool:
        """True when the chunk is committed and final (no record awaits a retry after a worker crash/timeout)."""
        record = self.chunk_record(chunk_id)
        return record is not None and record.get("final", True)

    def write_chunk(self, chunk_id: int, vocab: LibraVocab, fill: Callable[[SampleWriter], Dict[str, Any]]) -> Dict[str, Any]:
        """Write one chunk atomically: ``fill(writer)`` adds the samples and returns the chunk's counts/rejects."""
        tmp, final = self._tmp_prefix(chunk_id), self.part_prefix(chunk_id)
        if os.path.exists(final + ".json"):  # a non-final chunk being redone: uncommit it before replacing its data
            os.remove(final + ".json")
            _fsync_dir(self.directory)
        writer = SampleWriter(tmp + ".bin", vocab)
        try:
            record = fill(writer)
        finally:
            writer.finalize(tmp + ".idx")
        for ext in (".bin", ".idx"):
            _fsync_file(tmp + ext)
        os.replace(tmp + ".bin", final + ".bin")
        os.replace(tmp + ".idx", final + ".idx")
        record = dict(record, chunk_id=chunk_id, bin_bytes=os.path.getsize(final + ".bin"),
                      idx_bytes=os.path.getsize(final + ".idx"))
        atomic_write_json(final + ".json", record)
        _fsync_dir(self.directory)
        return record

    def missing(self, chunk_ids: Sequence[int]) -> List[int]:
        """The ids of ``chunk_ids`` without a complete, intact committed part."""
        return [c for c in chunk_ids if self.chunk_record(c) is None]

    def merge(self, chunk_ids: Sequence[int], dtype: type, sidecar: Dict[str, Any]) -> Dict[str, Any]:
        """Join every chunk (in id order) into the output dataset; ``sidecar`` is completed with the counts."""
        missing = self.missing(chunk_ids)
        if missing:
            shown = ", ".join(str(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise RuntimeError(f"cannot merge {self.output_prefix}: {len(missing)} chunk(s) not finished ({shown}); "
                               "run the missing ranks first")
        records = [self.chunk_record(c) for c in sorted(chunk_ids)]
        out = self.output_prefix
        kept = sum(record["samples"] for record in records)
        if kept == 0:
            rejected = sum(len(record["rejects"]) for record in records)
            reasons = count_by_reason(r for record in records for r in record["rejects"])
            raise RuntimeError(f"no sample kept: all {rejected} record(s) of the input were rejected "
                               f"({', '.join(f'{k}: {v}' for k, v in reasons.items()) or 'the input is empty'}); "
                               f"no dataset written at {out} (rejects are listed in {self.directory}/chunk-*.json)")
        if os.path.exists(sidecar_path(out)):
            os.remove(sidecar_path(out))  # the old commit marker goes first: a killed merge leaves no sidecar
        for stale in glob.glob(glob.escape(out) + ".tmp-merge-*"):
            os.remove(stale)
        tmp = f"{out}.tmp-merge-{os.getpid()}"
        merge_indexed([self.part_prefix(c) for c in sorted(chunk_ids)], tmp, dtype)
        rejects_tmp = tmp + ".rejects.jsonl"
        rejects = [r for record in records for r in record["rejects"]]
        with open(rejects_tmp, "w", encoding="utf-8") as handle:
            for reject in rejects:
                handle.write(json.dumps(reject, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        counts = {
            name: int(np.sum([record[name] for record in records], dtype=np.int64))
            for name in ("records", "samples", "images", "text_tokens")
        }
        counts["rejected"] = len(rejects)
        counts["retryable"] = sum(r["reason"] in RETRYABLE_REASONS for r in rejects)
        counts["rejected_by_reason"] = count_by_reason(rejects)
        os.replace(tmp + ".bin", out + ".bin")
        os.replace(tmp + ".idx", out + ".idx")
        os.replace(rejects_tmp, out + ".rejects.jsonl")
        sidecar = dict(sidecar, counts=counts, chunks=len(records), rejects_file=os.path.basename(out) + ".rejects.jsonl")
        atomic_write_json(sidecar_path(out), sidecar)
        _fsync_dir(os.path.dirname(os.path.abspath(out)))
        return sidecar
