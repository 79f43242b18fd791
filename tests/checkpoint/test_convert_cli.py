"""``tools/convert_checkpoint.py`` end to end: HF LLaMA -> engine (spawned rank) -> HF, and its errors.

The LLaMA text weights land unchanged (except the pad row := eos row, docs/architecture.md#initialisation), the new vision weights are the
per-key docs/architecture.md#initialisation initialisation (so independent of the layout), the exported model reproduces LLaMA's text logits,
and bad sources fail with a message naming the key / field before anything is written.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from libra_megatron.checkpoint.hf_llama import LlamaAsLibra, init_new_parameter
from libra_megatron.checkpoint.safe_io import CheckpointError
from libra_megatron.hf_modeling.configuration_libra import LibraConfig
from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6,
                                         tie_word_embeddings=False, **TINY)).eval()
    model.save_pretrained(str(folder / "st"))
    return model, str(folder / "st"), folder


def test_llama_to_engine_to_hf_via_the_cli(llama, tmp_path):
    model, source, _ = llama
    engine, exported = str(tmp_path / "engine"), str(tmp_path / "hf")
    run = _cli("hf-llama-to-engine", "--source", source, "--output", engine, "--model", "tiny", "--target-tp", "1",
               "--seed", "7")
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.isdir(os.path.join(engine, "iter_0000000"))
    run = _cli("engine-to-hf", "--source", engine, "--output", exported, "--dtype", "fp32")
    assert run.returncode == 0, run.stderr[-3000:]

    got = {}
    for path in glob.glob(os.path.join(exported, "*.safetensors")):
        got.update(load_file(path))
    llama_state = model.state_dict()
    for key, value in llama_state.items():
        if key == "model.embed_tokens.weight":
            assert torch.equal(got[key][1:], value[1:]) and torch.equal(got[key][0], value[2])  # pad := eos
        else:
            assert torch.equal(got[key], value), key
    config = LibraConfig(contiguous_signal_size=128, **TINY)
    from libra_megatron.checkpoint.hf_libra import constant_buffers

    buffers = constant_buffers(config)
    new = [k for k in got if k not in llama_state and k not in buffers]
    assert len(new) == 2 * 24 + 8 and set(got) == set(LibraForCausalLM(config).state_dict())
    for key in new:
        assert torch.equal(got[key], init_new_parameter(key, tuple(got[key].shape), 0.02, seed=7)), key
    assert not got["model.layers.1.self_attn.vision_v_bridge_on_language.weight_B"].any()
    assert torch.equal(got["model.vision_norm.weight"], torch.ones(64))

    libra = LibraForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        assert torch.allclose(libra(ids).logits[0, ..., :512], model(ids).logits, atol=1e-5)


def _tool():
    """tools/convert_checkpoint.py as a module (its errors are checked in-process: no spawn needed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_sources_fail_before_writing(llama, tmp_path, capsys):
    model, source, folder = llama
    tool = _tool()
    out = str(tmp_path / "never")
    assert tool.main(["hf-llama-to-engine", "--source", source, "--output", out, "--model", "libra-7b"]) == 2
    assert "text_vocab_size=32000 from --model libra-7b but 512 there" in capsys.readouterr().err
    assert tool.main(["hf-to-engine", "--source", source, "--output", out, "--model", "tiny"]) == 2
    assert "model_type is 'llama', expected 'libra'" in capsys.readouterr().err
    assert tool.main(["hf-llama-to-engine", "--source", source, "--output", out, "--model", "tiny",
                      "--target-tp", "3"]) == 2
    assert "--target-tp 3 does not divide 4 heads" in capsys.readouterr().err
    shard = glob.glob(os.path.join(source, "*.safetensors"))[0]
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for name in os.listdir(source):
        data = open(os.path.join(source, name), "rb").read()
        (truncated / name).write_bytes(data[:-64] if os.path.join(source, name) == shard else data)
    assert tool.main(["hf-llama-to-engine", "--source", str(truncated), "--output", out, "--model", "tiny"]) == 2
    assert "truncated or corrupt safetensors shard" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_llama_pickle_checkpoint_loads_weights_only_and_shapes_are_checked(llama, tmp_path):
    model, source, _ = llama
    folder = tmp_path / "bin"
    folder.mkdir()
    state = model.state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(open(os.path.join(source, "config.json")).read())
    config = LibraConfig(contiguous_signal_size=128, **TINY)
    view = LlamaAsLibra(str(folder), config, seed=7)
    assert torch.equal(view.get("model.layers.0.mlp.up_proj.weight"), state["model.layers.0.mlp.up_proj.weight"])
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 100)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.down_proj.weight: expected shape \[64, 176\], found \[64, 100\]"):
        LlamaAsLibra(str(folder), config)
