"""Presets, parameter counts and names at 7B (meta device), initialisation (docs/architecture.md#initialisation) and freezing (docs/architecture.md#trainable-parameters)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.fixtures import LIBRA_7B_SHAPES_JSON as SHAPES_JSON


def test_presets_and_derived_sizes() -> None:
    from libra_megatron.config import libra_config

    big = libra_config("libra-7b")
    assert (big.num_layers, big.hidden_size, big.num_attention_heads, big.ffn_hidden_size) == (32, 4096, 32, 11008)
    assert (big.signal_size, big.attention_rank, big.ffn_rank, big.bridge_rank) == (8192, 1024, 2752, 8)
    assert big.vocab.image_offset == 32000 and big.vocab.boi_id == 32512 and big.vocab.image_positions == 578
    assert big.layernorm_epsilon == 1e-6 and big.rotary_base == 10000.0 and big.clip_feature_size == 4096
    assert big.padded_text_vocab_size(1) == 32000 and big.padded_text_vocab_size(4) == 32256
    tiny = libra_config("tiny", text_vocab_size=500)
    assert tiny.vocab.text_vocab_size == 500 and tiny.vocab.image_positions == 578 and tiny.signal_size == 64 + 128
    with pytest.raises(ValueError, match="unknown Libra preset"):
        libra_config("libra-70b")
    with pytest.raises(ValueError, match="no dropout"):
        libra_config("tiny", hidden_dropout=0.1)


def _meta_7b() -> dict:
    from libra_megatron.checkpoint.hf_libra_names import engine_to_hf, hf_buffers
    from libra_megatron.config import libra_config
    from libra_megatron.model import LibraModel

    config = libra_config("libra-7b", use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        model = LibraModel(config)
    total = sum(p.numel() for p in model.parameters())
    model.set_training_stage("pretrain")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hf = engine_to_hf(dict(model.named_parameters()), config)
    buffers = hf_buffers(config.num_layers, config.kv_channels, 32000, 514, 4096)
    return dict(total=total, trainable=trainable, hf={k: tuple(v.shape) for k, v in hf.items()},
                buffers={k: tuple(v.shape) for k, v in buffers.items()})


def test_libra_7b_on_meta_device_has_the_released_counts_and_keys() -> None:
    (result,) = run_on_ranks(_meta_7b, world_size=1)
    assert result["total"] == 11_015_860_224
    assert result["trainable"] == 4_277_444_608
    with open(SHAPES_JSON) as f:
        released = {k: tuple(v) for k, v in json.load(f).items()}
    assert {**result["hf"], **result["buffers"]} == released


def _tiny_init_and_freezing() -> dict:
    from libra_megatron.checkpoint.hf_libra_names import hf_names
    from tests.model.helpers import build_model, make_batch, model_inputs, tiny_config

    config = tiny_config()
    model = build_model(config)
    params = dict(model.named_parameters())
    stats = {name: (float(p.mean()), float(p.std()), float(p.abs().max())) for name, p in params.items()}
    model.set_training_stage("pretrain")
    pretrain = {name for name, p in params.items() if p.requires_grad}
    names = {name: hf_names(name) for name in params}
    model.set_training_stage("instruct")
    batch = make_batch("image_mid")
    batch["tokens"][:, 0, 3] = 0  # a pad/unk id inside the text
    model(**model_inputs(batch)).sum().backward()
    pad_row_grad = float(params["embedding.word_embeddings.weight"].grad[0].abs().max())
    other_row_grad = float(params["embedding.word_embeddings.weight"].grad[batch["tokens"][0, 0, 2]].abs().max())
    return dict(stats=stats, pretrain=pretrain, names=names, pad=pad_row_grad, other=other_row_grad,
                all_grads=all(p.grad is not None for p in params.values()))


def test_tiny_initialisation_and_training_stages() -> None:
    (r,) = run_on_ranks(_tiny_init_and_freezing, world_size=1)
    stats, names = r["stats"], r["names"]
    for name, (mean, std, peak) in stats.items():
        hf = names[name]
        if "bridge" in hf[0] and hf[0].endswith("weight_B"):
            assert peak == 0.0, f"{name}: bridge B must start at zero"
        elif "layernorm" in name or "norm_weight" in name or "final_layernorm" in name:
            assert mean == 1.0 and std == 0.0, f"{name}: norms start at 1"
        elif any("vision" in n for n in hf):
            assert abs(std - 0.02) < 0.004 and abs(mean) < 0.004, f"{name}: new vision weights ~ N(0, 0.02), got {std}"
    expected = {name for name, hf in names.items() if any("vision" in n for n in hf)}
    assert r["pretrain"] == expected
    assert all(all("vision" in n for n in names[name]) for name in expected)
    assert r["all_grads"], "instruct trains every parameter"
    assert r["pad"] == 0.0 and r["other"] > 0.0, "the pad row (id 0) never gets a gradient, as nn.Embedding(padding_idx=0)"
