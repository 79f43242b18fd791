"""The harness proves itself on real megatron-core code: a tiny GPTModel (local spec) trained for 3 steps
gives the same losses, gradients and weights at TP=1, TP=2, PP=2 and DP=2 with the distributed optimizer."""
from __future__ import annotations

from typing import Dict, List, Optional

import pytest
import torch

from tests.distributed import RankFailure, run_on_ranks
from tests.megatron_helpers import assemble, assert_close_dicts, global_pieces, load_global

VOCAB, SEQ, GLOBAL_BATCH, STEPS = 128, 16, 4, 3


def _batches(step: int) -> torch.Tensor:
    """The same global batch every step, so three steps must lower its loss."""
    generator = torch.Generator().manual_seed(100)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)


def _train_gpt(initial: Optional[Dict[str, torch.Tensor]], distributed_optimizer: bool) -> Dict:
    """Build the tiny GPT for the current layout, train STEPS steps, return what the parent compares."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False,
    )
    model = GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="rope", share_embeddings_and_output_weights=False,
    )
    if initial is not None:
        load_global(model, initial)
    initial_pieces = global_pieces(model, lambda p: p.data)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0, use_distributed_optimizer=distributed_optimizer,
                        params_dtype=torch.float32),
        [model],
    )

    micro_batch = 1
    local = GLOBAL_BATCH // dp

    def forward_step(data_iterator, model_chunk):
        tokens = next(data_iterator)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(SEQ).unsqueeze(0).expand_as(inputs)
        per_token = model_chunk(inputs, positions, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return per_token, loss_func

    losses: List[float] = []
    grad_norms: List[float] = []
    first_grads = None
    for step in range(STEPS):
        batch = _batches(step)[dp_rank * local:(dp_rank + 1) * local]
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batch.split(micro_batch)), model=[model],
            num_microbatches=local // micro_batch, seq_length=SEQ, micro_batch_size=micro_batch, forward_only=False,
        )
        if step == 0 and not distributed_optimizer:
            first_grads = global_pieces(model.module, lambda p: p.main_grad)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        grad_norms.append(float(grad_norm))
        if ps.is_pipeline_last_stage():
            mean = torch.stack([r["lm loss"] for r in reports]).mean()
            dist.all_reduce(mean, group=ps.get_data_parallel_group())
            losses.append(float(mean) / dp)
    return {
        "losses": losses if ps.is_pipeline_last_stage() else None,
        "grad_norms": grad_norms,
        "initial": initial_pieces,
        "first_grads": first_grads,
        "final": global_pieces(model.module, lambda p: p.data),
    }


def _losses(results: List[Dict]) -> List[float]:
    return next(r["losses"] for r in results if r["losses"] is not None)


@pytest.fixture(scope="module")
def reference() -> Dict:
    (result,) = run_on_ranks(_train_gpt, world_size=1, args=(None, False))
    return {
        "losses": result["losses"],
        "grad_norms": result["grad_norms"],
        "initial": assemble([result["initial"]]),
        "first_grads": assemble([result["first_grads"]]),
        "final": assemble([result["final"]]),
    }


@pytest.mark.parametrize(
    "layout",
    [dict(tp=2, pp=1, distopt=False), dict(tp=1, pp=2, distopt=False), dict(tp=1, pp=1, distopt=True)],
    ids=["tp2", "pp2", "dp2-distopt"],
)
def test_gpt_three_steps_match_single_process(reference: Dict, layout: Dict) -> None:
    results = run_on_ranks(
        _train_gpt, world_size=2, tp=layout["tp"], pp=layout["pp"], args=(reference["initial"], layout["distopt"])
    )
    assert reference["losses"][0] > reference["losses"][-1], "training did not lower the loss"
    torch.testing.assert_close(torch.tensor(_losses(results)), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    for result in results:
        torch.testing.assert_close(torch.tensor(result["grad_norms"]), torch.tensor(reference["grad_norms"]), rtol=1e-5, atol=0)
    if not layout["distopt"]:
        grads = assemble(r["first_grads"] for r in results)
        assert_close_dicts(grads, reference["first_grads"], rtol=1e-5, what="step-1 gradients")
    final = assemble(r["final"] for r in results)
    # Adam divides by sqrt(v): for near-zero gradients a 1e-7 difference moves the update visibly, so the
    # weights after three steps get 1e-4; losses, grad norms and gradients above are held to 1e-5.
    assert_close_dicts(final, reference["final"], rtol=1e-4, what="weights after 3 steps")


def _raise_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 blocks here until the harness gives up on it


def test_harness_reports_the_failing_rank() -> None:
    with pytest.raises(RankFailure, match="deliberate failure on rank 1"):
        run_on_ranks(_raise_on_rank_one, world_size=2, timeout=60)


def _sleep_forever() -> None:
    import time

    time.sleep(3600)


def test_harness_times_out_on_a_hang() -> None:
    with pytest.raises(RankFailure, match="did not finish in time"):
        run_on_ranks(_sleep_forever, world_size=2, timeout=5)
