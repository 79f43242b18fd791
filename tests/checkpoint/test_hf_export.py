"""The HF Libra export folder (docs/architecture.md#hf-export-layout): shards and index, config/generation config, the shipped modeling code
loading through ``AutoModelForCausalLM(trust_remote_code=True)`` with libra-megatron unimportable, and validation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from libra_megatron.checkpoint.hf_libra import (
    constant_buffers,
    hf_key_shapes,
    load_hf_libra_config,
    validate_hf_libra,
    write_hf_libra,
)
from libra_megatron.checkpoint.hf_writer import plan_shards
from libra_megatron.checkpoint.safe_io import CheckpointError, HFCheckpointReader
from tests.hf_modeling.tiny import mixed_batch, tiny_model


def _export(model, out_dir, **kwargs) -> str:
    buffers = constant_buffers(model.config)
    params = ((k, v) for k, v in model.state_dict().items() if k not in buffers)
    return write_hf_libra(str(out_dir), model.config, params, **kwargs)


def test_shard_plan_respects_the_limit_and_keeps_order():
    shapes = [("a", (10,)), ("b", (30,)), ("c", (5,)), ("d", (100,)), ("e", (1,))]
    shards = plan_shards(shapes, torch.bfloat16, max_bytes=80)
    assert shards == [["a", "b"], ["c"], ["d"], ["e"]]
    assert sum(shards, []) == [k for k, _ in shapes]


def test_7b_shard_plan_reproduces_the_released_shard_sizes():
    """bf16, 5 GB limit, export order: 4.98 + 4.95 + 4.98 + 4.97 + 2.15 GB, as the released libra-11b (docs/architecture.md#hf-export-layout)."""
    from libra_megatron.hf_modeling.configuration_libra import LibraConfig

    key_shapes = hf_key_shapes(LibraConfig())
    sizes = dict(key_shapes)
    shards = plan_shards(key_shapes, torch.bfloat16)
    assert [round(sum(2 * torch.Size(sizes[k]).numel() for k in shard) / 1e9, 2) for shard in shards] == \
        [4.98, 4.95, 4.98, 4.97, 2.15]


def test_export_folder_layout_and_remote_code_load_without_libra_megatron(tmp_path):
    model = tiny_model()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"sp")
    (tok / "tokenizer_config.json").write_text("{}")
    out = _export(model, tmp_path / "export", tokenizer_dir=str(tok), max_shard_bytes=40_000)
    names = sorted(os.listdir(out))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(os.path.getsize(os.path.join(out, s)) < 40_000 + 20_000 for s in shards)
    for required in ("config.json", "generation_config.json", "model.safetensors.index.json", "modeling_libra.py",
                     "configuration_libra.py", "generation_libra.py", "tokenizer.model", "tokenizer_config.json"):
        assert required in names
    with open(os.path.join(out, "model.safetensors.index.json")) as handle:
        index = json.load(handle)
    assert set(index["weight_map"]) == {k for k, _ in hf_key_shapes(model.config)} == set(model.state_dict())
    with open(os.path.join(out, "config.json")) as handle:
        config = json.load(handle)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_libra.LibraForCausalLM"
    assert config["torch_dtype"] == "bfloat16" and config["hidden_size"] == 32 and config["model_type"] == "libra"
    reader = HFCheckpointReader(out)
    validate_hf_libra(reader, load_hf_libra_config(out))
    assert all(reader.infos[k].dtype == torch.bfloat16 for k in reader.keys())
    assert torch.equal(reader.get("eoi_to_newline_logits_placeholder").float(), model.eoi_to_newline_logits_placeholder)

    ids, vi, signal = mixed_batch()
    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    model.load_state_dict(rounded)
    with torch.no_grad():
        want = model(input_ids=ids, vision_indices=vi, contiguous_signal=signal).logits
    torch.save({"ids": ids, "vi": vi, "signal": signal}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["libra_megatron"] = None  # the export must not need libra-megatron
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True, dtype=torch.float32).eval()
        x = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            logits = model(input_ids=x["ids"], vision_indices=x["vi"], coninous_signal=x["signal"]).logits
            generated = model.generate(x["ids"], vision_indices=x["vi"], contiguous_signal=x["signal"], max_new_tokens=3)
        torch.save({{"logits": logits, "generated": generated, "cls": type(model).__module__}}, {str(tmp_path / 'out.pt')!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["cls"].startswith("transformers_modules")
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got["logits"]))
    assert torch.allclose(got["logits"][finite], want[finite], atol=1e-5)
    with torch.no_grad():
        assert torch.equal(got["generated"], model.generate(ids, vision_indices=vi, contiguous_signal=signal, max_new_tokens=3))


def test_export_rejects_wrong_shapes_and_missing_keys_before_publishing(tmp_path):
    model = tiny_model()
    state = {k: v for k, v in model.state_dict().items() if k not in constant_buffers(model.config)}
    bad = dict(state)
    bad["model.layers.1.self_attn.vision_q_proj.weight_A"] = torch.zeros(3, 32)
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.vision_q_proj.weight_A: expected shape \[8, 32\], found \[3, 32\]"):
        write_hf_libra(str(tmp_path / "a"), model.config, bad.items())
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "a.partial")
    partial = dict(state)
    del partial["lm_head.weight"]
    with pytest.raises(CheckpointError, match="never produced"):
        write_hf_libra(str(tmp_path / "b"), model.config, partial.items())
    out = write_hf_libra(str(tmp_path / "c"), model.config, state.items())
    with pytest.raises(CheckpointError, match="already exists"):
        write_hf_libra(out, model.config, state.items())
