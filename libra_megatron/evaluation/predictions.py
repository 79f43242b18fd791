"""Predictions as JSON lines, written so that a killed run resumes without redoing or double-counting an item.

Each rank appends to its own ``predictions.rank<R>.jsonl`` (one line per item: ``{"id", "prediction", ...}`` or
``{"id", "skipped": reason}``), flushing and fsyncing after every batch. On start every rank reads *all* rank files
(any world size wrote them), so the finished ids are the same on every rank and only the rest is split again; a
line cut by a kill is ignored (and the owner truncates its own file back to the last complete line before
appending). At the end rank 0 writes ``predictions.jsonl`` (atomic rename), one line per item id in the data file's
order (the first record of an id wins), which is what gets scored.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

RANK_PATTERN = "predictions.rank*.jsonl"
MERGED = "predictions.jsonl"


def _complete_lines(path: str) -> List[Dict]:
    records = []
    with open(path, "rb") as handle:
        data = handle.read()
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is an unfinished write
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_finished(folder: str) -> Dict[str, Dict]:
    """Records of every finished item in ``folder`` (all rank files and a merged file), by item id."""
    finished: Dict[str, Dict] = {}
    paths = sorted(glob.glob(os.path.join(folder, RANK_PATTERN)))
    merged = os.path.join(folder, MERGED)
    if os.path.isfile(merged):
        paths.insert(0, merged)
    for path in paths:
        for record in _complete_lines(path):
            if "id" in record:
                finished.setdefault(str(record["id"]), record)
    return finished


class PredictionWriter:
    """This rank's append-only predictions file."""

    def __init__(self, folder: str, rank: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"predictions.rank{rank}.jsonl")
        if os.path.exists(self.path):  # drop a line a kill left unfinished
            with open(self.path, "rb+") as handle:
                data = handle.read()
                end = data.rfind(b"\n") + 1
                if end != len(data):
                    handle.truncate(end)
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, records: Iterable[Dict]) -> None:
        """Append records and make them durable (a batch at a time)."""
        for record in records:
            self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        """Close the file."""
        self.handle.close()


def write_merged(folder: str, order: Sequence[str], finished: Optional[Dict[str, Dict]] = None) -> str:
    """``predictions.jsonl``: one record per id of ``order`` that has one (atomic)."""
    finished = read_finished(folder) if finished is None else finished
    path = os.path.join(folder, MERGED)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for item_id in order:
            if item_id in finished:
                handle.write(json.dumps(finished[item_id], ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path
