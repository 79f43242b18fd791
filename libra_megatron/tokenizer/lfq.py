"""Lookup-free quantisation (LFQ) of the Libra tokenizer (docs/architecture.md#lfq-quantiser, docs/architecture.md#lfq-training-loss): reference math, training loss and the
dispatch of code packing to the csrc kernel.

``project_in`` maps a latent to ``C * D`` logits (Libra: 1024 -> 18, C = 2 codebooks of D = 9 bits). Each logit
quantises to ``+1`` if ``> 0`` else ``-1`` (``codebook_scale`` 1); the D signs of codebook ``c`` are its id
(MSB first, see :mod:`libra_megatron.ops.lfq`). ``project_out`` maps the +-1 code back to the latent width.

Training (:meth:`LFQ.forward` in train mode) uses the straight-through estimator and the reference auxiliary
loss, with the reference weights (``entropy_loss_weight`` 0.1, ``commitment_loss_weight`` 1.0,
``diversity_gamma`` 2.5, ``inv_temperature`` 100)::

    aux = 0.1 * (H_sample - 2.5 * H_codebook) + 1.0 * MSE(u, sign(u))

``H_sample`` is the mean entropy of ``softmax(2 * inv_temperature * <u_c, code>)`` over the ``2^D`` codes;
``H_codebook`` is the entropy of the batch-averaged code distribution (per codebook, then averaged). When
``torch.distributed`` is initialised, the batch-averaged distribution is all-reduced over the data-parallel
group, so every rank sees the global-batch ``H_codebook``; its gradient is scaled for data-parallel gradient
*averaging* (Megatron's default), so the averaged gradients equal single-process gradients on the whole batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from libra_megatron.ops.lfq import lfq_codes, lfq_codes_reference


class LFQLossBreakdown(NamedTuple):
    """The terms of the LFQ auxiliary loss (before weighting)."""

    per_sample_entropy: torch.Tensor
    codebook_entropy: torch.Tensor
    commitment: torch.Tensor


class LFQOutput(NamedTuple):
    """What :meth:`LFQ.forward` returns."""

    quantized: torch.Tensor  # [..., dim] project_out(codes), straight-through in training
    indices: torch.Tensor  # [..., C] long
    aux_loss: torch.Tensor  # scalar (0 in eval mode)
    breakdown: LFQLossBreakdown


def entropy(prob: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Entropy along the last dim with the reference's clamp: ``-sum p * log(max(p, eps))``."""
    return (-prob * prob.clamp(min=eps).log()).sum(dim=-1)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group; backward sums the incoming gradients too (every rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def data_parallel_group():
    """The group the codebook statistics are reduced over: megatron's DP group if set up, else WORLD, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_data_parallel_group()
    except ImportError:
        pass
    return dist.group.WORLD


def lfq_entropy_terms(
    logits: torch.Tensor, codebook: torch.Tensor, inv_temperature: float = 100.0, group="auto"
) -> tuple:
    """(per-sample entropy, codebook entropy) of logits ``[M, C, D]`` against the +-1 ``codebook [K, D]``.

    ``group="auto"`` reduces the codebook statistics over :func:`data_parallel_group`; ``None`` keeps them local.
    """
    if group == "auto":
        group = data_parallel_group()
    distance = -2.0 * torch.einsum("mcd,kd->mck", logits, codebook.to(logits.dtype))
    prob = (-distance * inv_temperature).softmax(dim=-1)  # [M, C, K]
    per_sample = entropy(prob).mean()
    prob_sum = prob.sum(dim=0)  # [C, K]
    count = torch.tensor(float(prob.size(0)), dtype=prob.dtype, device=prob.device)
    if group is not None and dist.get_world_size(group) > 1:
        prob_sum = _AllReduceSum.apply(prob_sum, group)
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    codebook_entropy = entropy(prob_sum / count).mean()
    return per_sample, codebook_entropy


class LFQ(nn.Module):
    """Lookup-free quantiser with ``num_codebooks`` codebooks of ``codebook_size = 2^D`` sign codes."""

    def __init__(
        self,
        dim: int,
        codebook_size: int = 512,
        num_codebooks: int = 2,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 1.0,
        diversity_gamma: float = 2.5,
        inv_temperature: float = 100.0,
        codebook_scale: float = 1.0,
    ):
        super().__init__()
        bits = int(round(math.log2(codebook_size)))
        if 2**bits != codebook_size:
            raise ValueError(f"LFQ codebook_size must be a power of two, got {codebook_size}")
        self.dim, self.codebook_dim, self.num_codebooks, self.codebook_size = dim, bits, num_codebooks, codebook_size
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.inv_temperature = inv_temperature
        self.codebook_scale = codebook_scale
        code_dims = bits * num_codebooks
        self.project_in = nn.Linear(dim, code_dims)
        self.project_out = nn.Linear(code_dims, dim)
        self.register_buffer("mask", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)
        self.register_buffer("codebook", self.bits_to_codes(self._code_bits(torch.arange(codebook_size))), persistent=False)

    def _code_bits(self, indices: torch.Tensor) -> torch.Tensor:
        return ((indices[..., None].long() & self.mask.to(indices.device)) != 0).float()

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """0/1 bits -> ``-scale``/``+scale`` code values."""
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[..., dim]`` -> ``[..., C * D]`` (``project_in``)."""
        return self.project_in(x)

    def codes(self, x: torch.Tensor, use_kernel: bool = True) -> torch.Tensor:
        """Latents ``[..., dim]`` -> ids ``[..., C]`` (the kernel, or the reference packing)."""
        u = self.logits(x)
        return lfq_codes(u, self.num_codebooks) if use_kernel else lfq_codes_reference(u, self.num_codebooks)

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Ids ``[..., C]`` in ``0..2^D-1`` -> +-scale codes ``[..., C*D]`` (then ``[..., dim]`` via project_out)."""
        if indices.size(-1) != self.num_codebooks:
            raise ValueError(f"indices must be [..., {self.num_codebooks}], got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]")
        codes = self.bits_to_codes(self._code_bits(indices)).to(self.project_out.weight.dtype).flatten(-2)
        return self.project_out(codes) if project_out else codes

    def forward(self, x: torch.Tensor) -> LFQOutput:
        """Quantise latents ``[..., dim]``; in training mode with straight-through gradients and the aux loss."""
        u = self.logits(x)
        shaped = u.unflatten(-1, (self.num_codebooks, self.codebook_dim))  # [..., C, D]
        scale = torch.full_like(shaped, self.codebook_scale)
        quantized = torch.where(shaped > 0, scale, -scale)
        indices = (shaped > 0).long().mul(self.mask).sum(-1)
        zero = u.new_zeros(())
        if self.training:
            straight_through = shaped + (quantized - shaped).detach()
            per_sample, codebook_entropy = lfq_entropy_terms(
                shaped.reshape(-1, self.num_codebooks, self.codebook_dim), self.codebook, self.inv_temperature
            )
            commitment = F.mse_loss(shaped, quantized.detach())
            aux = (per_sample - self.diversity_gamma * codebook_entropy) * self.entropy_loss_weight
            aux = aux + commitment * self.commitment_loss_weight
            breakdown = LFQLossBreakdown(per_sample, codebook_entropy, commitment)
        else:
            straight_through, aux = quantized, zero
            breakdown = LFQLossBreakdown(zero, zero, zero)
        out = self.project_out(straight_through.flatten(-2))
        return LFQOutput(out, indices, aux, breakdown)
