"""LFQ code packing (sign bits -> ids) with the C++/CUDA kernel and its pure-PyTorch reference.

Semantics, shared by every implementation (``csrc/lfq_pack.h``):

* ``u = logits`` or, with ``bias``, ``u = logits.to(acc) + bias.to(acc)`` where ``acc`` is float64 for float64
  logits and float32 otherwise (the kernel fuses this add; the GEMM that makes the logits stays in torch);
* ``bit = (u > 0)``: NaN, +0.0 and -0.0 give 0, +inf gives 1;
* the ``D`` bits of codebook ``c`` (logit dims ``c*D .. c*D+D-1``) form ``id_c = sum_k bit_{c,k} * 2**(D-1-k)``,
  most significant bit first (the reference ``LFQ.mask`` = 2^[8..0]).

:func:`lfq_image_ids` also lays the ids out as the model consumes them: ``[C, N, P]`` plus an id offset, or the
whole image span ``[C, N, P + 2]`` with ``<boi>``/``<eoi>`` (:func:`image_token_ids` does this with the Libra
vocabulary, equal to ``LibraVocab.image_span``).
"""
from __future__ import annotations

from typing import Optional

import torch

from libra_megatron.ops.extension import get_extension
from libra_megatron.vocab import LIBRA_VOCAB, LibraVocab


def _bits_per_codebook(logits: torch.Tensor, codebooks: int) -> int:
    if logits.dim() < 1 or codebooks <= 0 or logits.size(-1) % codebooks != 0:
        raise ValueError(f"last dimension {logits.size(-1) if logits.dim() else None} is not divisible by codebooks={codebooks}")
    bits = logits.size(-1) // codebooks
    if not 1 <= bits <= 62:
        raise ValueError(f"bits per codebook must be in [1, 62], got {bits}")
    return bits


def _check_bias(logits: torch.Tensor, bias: torch.Tensor) -> None:
    if bias.dim() != 1 or bias.numel() != logits.size(-1):
        raise ValueError(f"bias must be [{logits.size(-1)}], got {tuple(bias.shape)}")


def _biased(logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if bias is None:
        return logits
    _check_bias(logits, bias)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.to(acc) + bias.to(device=logits.device, dtype=acc)


def lfq_codes_reference(logits: torch.Tensor, codebooks: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-PyTorch LFQ packing: ``[..., codebooks*D]`` float -> ``[..., codebooks]`` int64 ids."""
    bits = _bits_per_codebook(logits, codebooks)
    signs = (_biased(logits, bias) > 0).view(*logits.shape[:-1], codebooks, bits).long()
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=logits.device, dtype=torch.long)
    return (signs * weights).sum(-1)


def _can_use_kernel(ext, tensor: torch.Tensor) -> bool:
    if ext is None or tensor.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return False
    return tensor.device.type == "cpu" or (tensor.device.type == "cuda" and ext.with_cuda)


def lfq_codes(logits: torch.Tensor, codebooks: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LFQ packing through the extension when available for this device, else the reference."""
    ext = get_extension()
    if _can_use_kernel(ext, logits):
        _bits_per_codebook(logits, codebooks)
        if bias is not None:
            _check_bias(logits, bias)
            bias = bias.to(logits.device)
        return ext.lfq_codes(logits, codebooks, bias)
    return lfq_codes_reference(logits, codebooks, bias)


def _check_image_args(logits: torch.Tensor, boi_id: Optional[int], eoi_id: Optional[int]) -> None:
    if logits.dim() != 3:
        raise ValueError(f"image logits must be [images, patches, codebooks*bits], got {tuple(logits.shape)}")
    if (boi_id is None) != (eoi_id is None):
        raise ValueError("give both boi_id and eoi_id, or neither")


def lfq_image_ids_reference(
    logits: torch.Tensor,
    codebooks: int,
    bias: Optional[torch.Tensor] = None,
    offset: int = 0,
    boi_id: Optional[int] = None,
    eoi_id: Optional[int] = None,
) -> torch.Tensor:
    """Pure-PyTorch: ``[N, P, C*D]`` -> ids ``[C, N, P]`` + offset, or ``[C, N, P+2]`` with ``<boi>``/``<eoi>``."""
    _check_image_args(logits, boi_id, eoi_id)
    ids = lfq_codes_reference(logits, codebooks, bias).permute(2, 0, 1) + offset
    if boi_id is None:
        return ids.contiguous()
    shape = (*ids.shape[:2], 1)
    boi = torch.full(shape, boi_id, dtype=torch.long, device=ids.device)
    eoi = torch.full(shape, eoi_id, dtype=torch.long, device=ids.device)
    return torch.cat([boi, ids, eoi], dim=-1)


def lfq_image_ids(
    logits: torch.Tensor,
    codebooks: int,
    bias: Optional[torch.Tensor] = None,
    offset: int = 0,
    boi_id: Optional[int] = None,
    eoi_id: Optional[int] = None,
) -> torch.Tensor:
    """:func:`lfq_image_ids_reference` through the C++/CUDA kernel when available (one pass, bit-identical)."""
    _check_image_args(logits, boi_id, eoi_id)
    _bits_per_codebook(logits, codebooks)
    if bias is not None:
        _check_bias(logits, bias)
    ext = get_extension()
    if _can_use_kernel(ext, logits):
        if bias is not None:
            bias = bias.to(logits.device)
        return ext.lfq_image_ids(logits, codebooks, bias, int(offset), boi_id, eoi_id)
    return lfq_image_ids_reference(logits, codebooks, bias, offset, boi_id, eoi_id)


def image_token_ids(
    logits: torch.Tensor, bias: Optional[torch.Tensor] = None, vocab: LibraVocab = LIBRA_VOCAB
) -> torch.Tensor:
    """Model-space ids of whole images, ``[C, N, 578]`` (``<boi>``, codes + text-vocab offset, ``<eoi>``).

    Equal to ``vocab.image_span(codes)`` for ``codes = lfq_image_ids(logits, C, bias)``.
    """
    bits = (vocab.codebook_size - 1).bit_length()
    if 2**bits != vocab.codebook_size or logits.dim() != 3 or logits.shape[1:] != (
        vocab.patches_per_image, vocab.num_codebooks * bits
    ):
        raise ValueError(
            f"image logits must be [N, {vocab.patches_per_image}, {vocab.num_codebooks * bits}] for this vocabulary, "
            f"got {tuple(logits.shape)}"
        )
    return lfq_image_ids(logits, vocab.num_codebooks, bias, vocab.image_offset, vocab.boi_id, vocab.eoi_id)
