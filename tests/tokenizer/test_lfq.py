"""LFQ quantiser and its training loss (docs/architecture.md#lfq-quantiser, docs/architecture.md#lfq-training-loss), including the data-parallel codebook entropy.

The loss is checked against an independent transcription of the reference ``LFQ.forward`` (codes enumerated
explicitly); DP=2 over gloo must equal single-process math on the concatenated batch (loss, parameter gradients
after DP averaging, input gradients scaled by the DP size).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from libra_megatron.tokenizer.lfq import LFQ, entropy, lfq_entropy_terms
from tests.distributed import run_on_ranks

DIM, BITS, CODEBOOKS = 24, 4, 2


def _reference_aux_loss(u: torch.Tensor, bits: int, gamma=2.5, inv_temperature=100.0, w_ent=0.1, w_commit=1.0):
    """Reference LFQ loss, written out: u [M, C*D] -> (aux, per_sample, codebook, commitment)."""
    m = u.shape[0]
    u = u.view(m, -1, bits)
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=u.dtype)  # row k = bits of k, MSB first
    logits = 2 * inv_temperature * torch.einsum("mcd,kd->mck", u, codes)
    prob = torch.softmax(logits, dim=-1)
    ent = lambda p: -(p * torch.log(torch.clamp(p, min=1e-5))).sum(-1)  # noqa: E731
    per_sample = ent(prob).mean()
    codebook = ent(prob.mean(0)).mean()
    commitment = ((u - torch.where(u > 0, 1.0, -1.0)) ** 2).mean()
    aux = w_ent * (per_sample - gamma * codebook) + w_commit * commitment
    return aux, per_sample, codebook, commitment


def _lfq(seed: int = 0) -> LFQ:
    torch.manual_seed(seed)
    return LFQ(DIM, codebook_size=2**BITS, num_codebooks=CODEBOOKS)


def _batch(seed: int = 1, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 5, DIM, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_codebook_order_matches_bits():
    q = _lfq()
    for k in range(2**BITS):
        expected = [1.0 if (k >> (BITS - 1 - i)) & 1 else -1.0 for i in range(BITS)]
        assert q.codebook[k].tolist() == expected


def test_eval_forward_indices_and_codes():
    q = _lfq().eval()
    x = _batch()
    out = q(x)
    u = q.project_in(x)
    expected = ((u.view(8, 5, CODEBOOKS, BITS) > 0).long() * (2 ** torch.arange(BITS - 1, -1, -1))).sum(-1)
    assert torch.equal(out.indices, expected)
    assert torch.equal(q.codes(x), expected) and torch.equal(q.codes(x, use_kernel=False), expected)
    signs = torch.where(u > 0, 1.0, -1.0)
    assert torch.allclose(out.quantized, q.project_out(signs), atol=0, rtol=0)
    assert torch.equal(q.indices_to_codes(out.indices, project_out=False), signs)
    assert out.aux_loss.item() == 0.0


def test_training_loss_matches_reference_transcription():
    q = _lfq().train()
    x = _batch()
    out = q(x)
    aux, per_sample, codebook, commitment = _reference_aux_loss(q.project_in(x).reshape(-1, CODEBOOKS * BITS), BITS)
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.breakdown.per_sample_entropy, per_sample, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.breakdown.codebook_entropy, codebook, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.breakdown.commitment, commitment, rtol=1e-6, atol=1e-7)


def test_straight_through_gradient():
    q = _lfq().train()
    x = _batch().requires_grad_(True)
    out = q(x)
    out.quantized.sum().backward()
    # d/du of project_out(u + (sign(u) - u).detach()) is project_out's weight: identity through the quantiser.
    u_grad = q.project_out.weight.sum(0)
    expected = u_grad @ q.project_in.weight
    torch.testing.assert_close(x.grad, expected.expand_as(x), rtol=1e-5, atol=1e-6)


def test_entropy_clamp():
    p = torch.tensor([[1.0, 0.0, 0.0]])
    assert entropy(p).item() == pytest.approx(0.0)
    assert entropy(torch.full((1, 4), 0.25)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


def _dp_rank_step(seed: int):
    """One training forward/backward of the LFQ loss on this rank's half of the global batch."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    q = _lfq(seed).train()
    x = _batch(seed + 1).chunk(dp)[rank].clone().requires_grad_(True)
    out = q(x)
    out.aux_loss.backward()
    terms = lfq_entropy_terms(q.project_in(x).detach().view(-1, CODEBOOKS, BITS), q.codebook)
    assert dist.get_world_size() == dp
    return {
        "loss": out.aux_loss.item(),
        "codebook_entropy": terms[1].item(),
        "x_grad": x.grad,
        "param_grads": {name: p.grad for name, p in q.named_parameters() if p.grad is not None},
        "dp": dp,
    }


def test_data_parallel_codebook_entropy_equals_single_process():
    seed = 3
    ranks = run_on_ranks(_dp_rank_step, world_size=2, tp=1, pp=1, args=(seed,))
    q = _lfq(seed).train()
    x = _batch(seed + 1).clone().requires_grad_(True)
    out = q(x)
    out.aux_loss.backward()
    dp = ranks[0]["dp"]
    assert dp == 2
    # every rank sees the global-batch codebook entropy
    for result in ranks:
        assert result["codebook_entropy"] == pytest.approx(out.breakdown.codebook_entropy.item(), rel=1e-6, abs=1e-7)
    # the DP-averaged loss and parameter gradients equal the single-process ones
    assert sum(r["loss"] for r in ranks) / dp == pytest.approx(out.aux_loss.item(), rel=1e-5, abs=1e-6)
    for name, p in q.named_parameters():
        if p.grad is None:
            continue
        averaged = sum(r["param_grads"][name] for r in ranks) / dp
        torch.testing.assert_close(averaged, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # each rank's input gradient is dp x its slice of the single-process gradient (DP averaging divides it back)
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["x_grad"] / dp, x.grad.chunk(dp)[rank], rtol=1e-5, atol=1e-7)
