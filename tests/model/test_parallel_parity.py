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

    from tests.model.helpers import (build_model, hf_weights, load_hf, local_grads, make_batch, run_schedule,
                                     tiny_config, tiny_sizes)

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
