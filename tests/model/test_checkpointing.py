"""Distributed checkpoints reshard: saved at TP=2 (padded vocab 512), loaded at TP=1 (padded 384) and at PP=2,
the model gives the loss of the weights it was saved with; and the HF name map round-trips."""
from __future__ import annotations

import torch

from tests.distributed import run_on_ranks

TEXT_VOCAB = 300


def _save(path: str) -> None:
    from megatron.core import dist_checkpointing

    from libra_megatron.utils.megatron_compat import use_in_process_write_queue
    from tests.model.helpers import build_model, hf_weights, load_hf, tiny_config, tiny_sizes

    config = tiny_config(TEXT_VOCAB)
    model = build_model(config)
    load_hf(model, hf_weights(tiny_sizes(TEXT_VOCAB)), config)
    use_in_process_write_queue()  # synchronous save: no Manager process inside a daemonic worker
    dist_checkpointing.save(model.sharded_state_dict(), path)


def _load_and_loss(path, load: bool):
    from megatron.core import dist_checkpointing

    from tests.model.helpers import build_model, hf_weights, load_hf, make_batch, run_schedule, tiny_config, tiny_sizes

    config = tiny_config(TEXT_VOCAB, calculate_per_token_loss=True, pipeline_dtype=torch.float32)
    model = build_model(config)  # fresh random init
    if load:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))
    else:
        load_hf(model, hf_weights(tiny_sizes(TEXT_VOCAB)), config)
    return run_schedule(model, config, [make_batch("two_images", T=TEXT_VOCAB)], forward_only=True)


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    run_on_ranks(_save, world_size=2, tp=2, args=(path,))
    (expected,) = run_on_ranks(_load_and_loss, world_size=1, args=(path, False))
    (at_tp1,) = run_on_ranks(_load_and_loss, world_size=1, args=(path, True))
    at_pp2 = [r for r in run_on_ranks(_load_and_loss, world_size=2, pp=2, args=(path, True)) if r is not None][0]
    torch.testing.assert_close(torch.tensor(at_tp1), torch.tensor(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(at_pp2), torch.tensor(expected), rtol=1e-6, atol=0)


def test_hf_name_map_round_trip() -> None:
    from libra_megatron.checkpoint.hf_libra_names import (
        LAYER_MAP,
        TOP_MAP,
        engine_to_hf,
        hf_to_engine,
        merge_tp_shards,
        split_tp,
    )
    from libra_megatron.config import libra_config
    from tests.model.helpers import hf_weights, tiny_sizes

    config = libra_config("tiny", text_vocab_size=TEXT_VOCAB)
    hf = hf_weights(tiny_sizes(TEXT_VOCAB))
    names = list(TOP_MAP) + [f"decoder.layers.{i}.{n}" for i in range(config.num_layers) for n in LAYER_MAP]
    engine = hf_to_engine(hf, names, config, padded_vocab_size=512)
    assert engine["embedding.word_embeddings.weight"].shape == (512, 64)
    back = engine_to_hf(engine, config)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    for name, tensor in engine.items():
        for tp in (2, 4):
            shards = split_tp(name, tensor, tp)
            assert torch.equal(merge_tp_shards(name, shards), tensor), name
    q, k, v = (hf[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    fused = engine["decoder.layers.0.self_attention.linear_qkv.weight"]
    head = 64 // 4
    assert torch.equal(fused[:head], q[:head]) and torch.equal(fused[head:2 * head], k[:head])  # [q_0; k_0; v_0; q_1 ...]
    gate_up = split_tp("decoder.layers.0.mlp.linear_fc1.weight", engine["decoder.layers.0.mlp.linear_fc1.weight"], 2)[1]
    gate = hf["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(gate_up[:88], gate[88:])  # rank 1 holds [gate_1; up_1]
