"""Reading user checkpoints safely: a malicious pickle is never executed, truncated safetensors shards fail with a
message naming the file and the sizes, indexed shards are cross-checked."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from libra_megatron.checkpoint.safe_io import CheckpointError, HFCheckpointReader, load_pickle_weights


class _Exploit:
    """Unpickling this would create a marker file (stands for arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": _Exploit(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refused to load.*weights_only=True"):
        HFCheckpointReader(str(folder))
    assert not marker.exists()


def test_plain_tensor_pickle_loads(tmp_path):
    torch.save({"a": torch.arange(3.0)}, tmp_path / "w.bin")
    assert torch.equal(load_pickle_weights(str(tmp_path / "w.bin"))["a"], torch.arange(3.0))


def test_truncated_safetensors_shard_fails_clearly(tmp_path):
    save_file({"a": torch.zeros(64), "b": torch.ones(8, 8)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"c": torch.ones(16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                                           "c": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    reader = HFCheckpointReader(str(tmp_path))
    assert reader.shape("b") == (8, 8) and torch.equal(reader.get("c"), torch.ones(16))
    shard = tmp_path / "model-00001-of-00002.safetensors"
    size = os.path.getsize(shard)
    with open(shard, "r+b") as handle:
        handle.truncate(size - 100)
    with pytest.raises(CheckpointError, match=rf"model-00001-of-00002.safetensors: truncated or corrupt safetensors shard: "
                                              rf"header describes {size} bytes, file has {size - 100} bytes"):
        HFCheckpointReader(str(tmp_path))
    with open(shard, "r+b") as handle:
        handle.truncate(5)
    with pytest.raises(CheckpointError, match="no header"):
        HFCheckpointReader(str(tmp_path))


def test_index_pointing_to_missing_shard_or_wrong_file(tmp_path):
    save_file({"a": torch.zeros(4)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing"):
        HFCheckpointReader(str(tmp_path))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        HFCheckpointReader(str(tmp_path / ".."))
