"""Loss and every gradient under TP=2, TP=2 + sequence parallel, PP=2 (1F1B, with full recompute) and
TP=2 × PP=2 + SP equal TP=1 (fp32, ≤1e-5 relative), through megatron-core's own pipeline schedules.

Each schedule call runs one group of micro-batches of equal length; the groups mix the segment routing plan,
the index plan and packed samples, and the text vocab (300) is one megatron pads at TP=2 (to 512)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.model.helpers import max_relative_error, merge_grads

TEXT_VOCAB = 300
GROUPS: List[List[Tuple[str, bool]]] = [
    [("image_mid", False), ("mixed_offsets", False)],  # L=598: segment plan, then index plan
    [("two_images", False)],  # L=1168, five segments
    [("image_mid", True)],  # L=606: packed samples
    [("text_only", False)],  # L=40: no image rows at all
]


def _run_groups(groups, sequence_parallel: bool = False, recompute: bool = False) -> Dict:
    from megatron.core import parallel_state as ps

    from tests.model.helpers import (
        build_model,
        hf_weights,
        load_hf,
        local_grads,
        make_batch,
        run_schedule,
        tiny_config,
        tiny_sizes,
    )

    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    config = tiny_config(TEXT_VOCAB, sequence_parallel=sequence_parallel, calculate_per_token_loss=True,
                         pipeline_dtype=torch.float32, **extra)
    model = build_model(config)
    load_hf(model, hf_weights(tiny_sizes(TEXT_VOCAB)), config)
    losses, grads = [], []
    for group in groups:
        model.zero_grad()
        losses.append(run_schedule(model, config, [make_batch(layout, T=TEXT_VOCAB, packed=packed) for layout, packed in group]))
        grads.append(local_grads(model, config))
    return {"losses": losses if ps.is_pipeline_last_stage() else None, "grads": grads, "config": config}


def _summarise(results: List[Dict]):
    config = results[0]["config"]
    losses = [x for group in next(r["losses"] for r in results if r["losses"] is not None) for x in group]
    grads = [merge_grads([r["grads"][g] for r in results], config) for g in range(len(GROUPS))]
    return losses, grads


@pytest.fixture(scope="module")
def single_process():
    return _summarise(run_on_ranks(_run_groups, world_size=1, args=(GROUPS,)))


LAYOUTS = {
    "tp2": dict(world_size=2, tp=2, pp=1, kwargs={}),
    "tp2-sp": dict(world_size=2, tp=2, pp=1, kwargs=dict(sequence_parallel=True)),
    "pp2-recompute": dict(world_size=2, tp=1, pp=2, kwargs=dict(recompute=True)),
    "tp2xpp2-sp": dict(world_size=4, tp=2, pp=2, kwargs=dict(sequence_parallel=True)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_loss_and_gradients_match_single_process(single_process, name: str) -> None:
    layout = LAYOUTS[name]
    results = run_on_ranks(_run_groups, world_size=layout["world_size"], tp=layout["tp"], pp=layout["pp"],
                           args=(GROUPS,), kwargs=layout["kwargs"])  # every group length is even (SP)
    losses, grads = _summarise(results)
    ref_losses, ref_grads = single_process
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for group, (got, ref) in enumerate(zip(grads, ref_grads)):
        assert set(got) == set(ref)
        for key, expected in ref.items():
            if expected.abs().max() == 0:
                assert got[key].abs().max() == 0, f"group {group}: {key} should have no gradient"
            else:
                assert max_relative_error(got[key], expected) <= 1e-5, f"group {group}: {key}"


def _interleaved(num_layers: int):
    """PP=2 × virtual pipeline 2 (interleaved 1F1B, one layer per chunk) or the single-process reference."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from libra_megatron.model import LibraModel, libra_loss_reduction
    from tests.model.helpers import hf_weights, load_hf, local_grads, make_batch, model_inputs, tiny_config, tiny_sizes

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    extra = dict(virtual_pipeline_model_parallel_size=vpp, batch_p2p_comm=False) if vpp else {}
    config = tiny_config(TEXT_VOCAB, num_layers=num_layers, calculate_per_token_loss=True,
                         pipeline_dtype=torch.float32, **extra)
    sizes = dict(tiny_sizes(TEXT_VOCAB), layers=num_layers)
    chunks = []
    for stage in range(vpp or 1):
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunk = LibraModel(config, pre_process=first, post_process=last, vp_stage=stage if vpp else None)
        load_hf(chunk, hf_weights(sizes), config)
        chunks.append(chunk)
    batches = [make_batch(layout, T=TEXT_VOCAB) for layout in ("image_mid", "mixed_offsets")]

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        return chunk(**model_inputs(batch)), lambda out: libra_loss_reduction(
            out, batch["labels"], batch["vision_indices"], config.vocab)

    B, L = batches[0]["vision_indices"].shape
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(batches) for _ in chunks], model=chunks,
        num_microbatches=len(batches), seq_length=L, micro_batch_size=B, forward_only=False,
    )
    grads = {}
    for chunk in chunks:
        grads.update(local_grads(chunk, config))
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    return {"losses": [float(r["lm loss"][0]) for r in reports] if last else None, "grads": grads, "config": config}


def test_interleaved_virtual_pipeline_matches_single_process() -> None:
    (ref,) = run_on_ranks(_interleaved, world_size=1, args=(4,))
    results = run_on_ranks(_interleaved, world_size=2, pp=2, vpp=2, args=(4,))
    losses = next(r["losses"] for r in results if r["losses"] is not None)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    got = merge_grads([r["grads"] for r in results], ref["config"])
    expected = merge_grads([ref["grads"]], ref["config"])
    assert set(got) == set(expected)
    for key, value in expected.items():
        if value.abs().max() > 0:
            assert max_relative_error(got[key], value) <= 1e-5, key
