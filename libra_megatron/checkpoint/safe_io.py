"""Safe, lazy reading of Hugging Face checkpoints (safetensors shards or ``.bin`` pickles) for the converters.

- safetensors: headers are read first (keys, shapes, dtypes without loading data); a shard whose size does not
  match its header (truncated download) is rejected naming the file, the expected and the found size.
- ``.bin``: loaded only through ``torch.load(weights_only=True)`` — an arbitrary pickle (code execution) is refused
  with a clear error; nothing from a user path is ever unpickled with the full pickle machinery.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, unsafe or does not hold what the converter expects."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known before loading it."""

    file: str
    shape: Tuple[int, ...]
    dtype: torch.dtype


def read_config_json(folder: str, what: str = "config") -> Tuple[str, Dict]:
    """``(path, dict)`` of ``<folder>/config.json``; an unreadable file is a :class:`CheckpointError` naming it."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as handle:
            return path, json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable {what} ({err})") from err


def read_safetensors_header(path: str) -> Dict[str, TensorInfo]:
    """Parse a safetensors header and check the file holds every byte the header promises."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file: header says {header_len} header bytes, "
                                      f"file has {size - 8} after the length field")
            header = json.loads(handle.read(header_len))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    infos: Dict[str, TensorInfo] = {}
    data_end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {meta.get('dtype')!r}")
        infos[key] = TensorInfo(path, tuple(int(d) for d in meta["shape"]), SAFETENSORS_DTYPES[meta["dtype"]])
        data_end = max(data_end, int(meta["data_offsets"][1]))
    expected = 8 + header_len + data_end
    if size != expected:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors shard: header describes {expected} bytes, "
                              f"file has {size} bytes")
    return infos


def load_pickle_weights(path: str) -> Dict[str, torch.Tensor]:
    """Load a ``.bin``/``.pt`` state dict with ``weights_only=True``; refuse anything that is not plain tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain-tensor checkpoint loadable with torch.load(weights_only=True) "
            f"(arbitrary pickles are never executed; convert it to safetensors with a trusted tool). Detail: {err}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors, got {type(state).__name__}")
    return state


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint folder (``model*.safetensors`` or ``pytorch_model*.bin``)."""

    def __init__(self, folder: str) -> None:
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: not a directory")
        self.folder = folder
        self.infos: Dict[str, TensorInfo] = {}
        self._bin_cache: Tuple[Optional[str], Optional[Dict[str, torch.Tensor]]] = (None, None)
        self._handles: Dict[str, object] = {}
        files = self._list_files()
        for path in files:
            if path.endswith(".safetensors"):
                self._add(read_safetensors_header(path))
            else:
                state = load_pickle_weights(path)
                self._add({k: TensorInfo(path, tuple(v.shape), v.dtype) for k, v in state.items()})
                del state

    def _list_files(self) -> List[str]:
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = os.path.join(self.folder, index_name)
            if os.path.exists(index):
                try:
                    with open(index) as handle:
                        weight_map = json.load(handle)["weight_map"]
                except (OSError, json.JSONDecodeError, KeyError) as err:
                    raise CheckpointError(f"{index}: unreadable index ({err})") from err
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not os.path.exists(os.path.join(self.folder, f))]
                if missing:
                    raise CheckpointError(f"{index}: shard(s) listed but missing: {missing}")
                self._weight_map = weight_map
                return [os.path.join(self.folder, f) for f in files]
            if os.path.exists(os.path.join(self.folder, single)):
                self._weight_map = None
                return [os.path.join(self.folder, single)]
        raise CheckpointError(f"{self.folder}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")

    def _add(self, infos: Dict[str, TensorInfo]) -> None:
        for key, info in infos.items():
            if key in self.infos:
                raise CheckpointError(f"{info.file}: tensor {key!r} also in {self.infos[key].file}")
            if self._weight_map is not None and os.path.basename(info.file) != self._weight_map.get(key, os.path.basename(info.file)):
                raise CheckpointError(f"{info.file}: tensor {key!r} is indexed in {self._weight_map[key]}")
            self.infos[key] = info

    def keys(self) -> List[str]:
        return list(self.infos)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.infos[key].shape

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor (safetensors: only its bytes; .bin: the shard stays memory-mapped while reading it)."""
        info = self.infos[key]
        if info.file.endswith(".safetensors"):
            from safetensors import safe_open

            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(info.file, framework="pt", device="cpu")
            return handle.get_tensor(key)
        cached_file, cached = self._bin_cache
        if cached_file != info.file:
            cached = load_pickle_weights(info.file)
            self._bin_cache = (info.file, cached)
        return cached[key]

    def items(self, keys: Optional[List[str]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
        for key in keys if keys is not None else self.keys():
            yield key, self.get(key)
