"""LFQ packing kernels (C++ and CUDA) are bit-identical to the PyTorch reference (docs/architecture.md#lfq-quantiser bit order, docs/architecture.md#ids ids).

Covers every edge value (+-0, NaN, +-inf, subnormals, the largest finite values), odd shapes, fp32/fp64/fp16/bf16,
the fused bias add (including bias values that cancel a logit exactly), the image layout with offset and
<boi>/<eoi> (== LibraVocab.image_span), and non-contiguous input. CUDA cases run only where CUDA and a CUDA build
of the extension exist.
"""
from __future__ import annotations

import pytest
import torch

from libra_megatron.ops import lfq
from libra_megatron.ops.extension import get_extension
from libra_megatron.vocab import LIBRA_VOCAB, LibraVocab

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), info.tiny, -info.tiny,
              info.tiny / 4, -info.tiny / 4, info.max, -info.max, info.eps, -info.eps, 1.0, -1.0]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def _logits(shape, dtype, seed, edge_fraction=0.4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    flat = x.view(-1)
    picks = torch.rand(flat.numel(), generator=generator) < edge_fraction
    edges = _edge_values(dtype)
    flat[picks] = edges[torch.randint(0, len(edges), (int(picks.sum()),), generator=generator)]
    return x


def _devices():
    ext = get_extension()
    cuda = torch.cuda.is_available() and ext is not None and ext.with_cuda
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not cuda, reason="needs CUDA and a CUDA build of _C"))]


@pytest.fixture(scope="module")
def ext():
    module = get_extension()
    assert module is not None, "libra_megatron._C must be built for the kernel tests (make ext)"
    return module


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_match_reference_on_edge_values(ext, device, dtype):
    for seed, shape, codebooks in [(0, (1, 18), 2), (1, (7, 576, 18), 2), (2, (3, 5, 2), 2), (3, (5, 124), 2),
                                   (4, (9, 62), 1), (5, (11, 3, 24), 3), (6, (1,), 1)]:
        x = _logits(shape, dtype, seed).to(device)
        expected = lfq.lfq_codes_reference(x.cpu(), codebooks)
        assert torch.equal(ext.lfq_codes(x, codebooks).cpu(), expected), (shape, codebooks)
        assert torch.equal(lfq.lfq_codes(x, codebooks).cpu(), expected)


def test_every_sign_pattern_packs_msb_first(ext):
    """All 2^9 sign patterns of one codebook: id == the pattern read as a binary number, first dim = MSB."""
    ids = torch.arange(512)
    bits = (ids[:, None] >> torch.arange(8, -1, -1)) & 1
    x = torch.where(bits.bool(), torch.tensor(0.5), torch.tensor(-0.0))
    assert torch.equal(lfq.lfq_codes_reference(x, 1)[:, 0], ids)
    assert torch.equal(ext.lfq_codes(x, 1)[:, 0], ids)


def test_nan_zero_and_inf_semantics(ext):
    x = torch.tensor([[float("nan"), 0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 1.0, -1.0]])
    # bits: NaN 0, +0 0, -0 0, +inf 1, -inf 0, +denormal 1, -denormal 0, 1 1, -1 0  -> 0b000101010
    assert lfq.lfq_codes_reference(x, 1).item() == 0b000101010
    assert ext.lfq_codes(x, 1).item() == 0b000101010


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_bias_matches_reference(ext, device, dtype):
    generator = torch.Generator().manual_seed(7)
    x = _logits((13, 577, 18), dtype, 11).to(device)
    edges = _edge_values(torch.float32)
    biases = [
        torch.randn(18, generator=generator),
        torch.zeros(18),
        edges[torch.randint(0, len(edges), (18,), generator=generator)],
        -x.reshape(-1, 18)[3].float().cpu(),  # cancels row 3 exactly: u = +0 -> bit 0
    ]
    for bias in biases:
        bias = bias.to(device)
        expected = lfq.lfq_codes_reference(x.cpu(), 2, bias.cpu())
        assert torch.equal(ext.lfq_codes(x, 2, bias).cpu(), expected)
        expected_image = lfq.lfq_image_ids_reference(x.cpu(), 2, bias.cpu(), 32000, 32512, 32513)
        assert torch.equal(lfq.lfq_image_ids(x, 2, bias, 32000, 32512, 32513).cpu(), expected_image)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("images", [1, 2, 3, 17])
def test_image_layout_offset_and_special_tokens(ext, device, images):
    x = _logits((images, 576, 18), torch.float32, images).to(device)
    plain = lfq.lfq_image_ids(x, 2)
    assert plain.shape == (2, images, 576) and plain.is_contiguous()
    assert torch.equal(plain.cpu(), lfq.lfq_image_ids_reference(x.cpu(), 2))
    assert torch.equal(plain.cpu(), lfq.lfq_codes_reference(x.cpu(), 2).permute(2, 0, 1))
    spans = lfq.image_token_ids(x)
    assert torch.equal(spans.cpu(), LIBRA_VOCAB.image_span(plain.cpu()))


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_views_and_partial_blocks(ext, device, dtype):
    """Views starting off a 16-byte boundary and row counts that leave a partial last block (CUDA staging paths)."""
    big = _logits((1 + 257 * 3, 18), dtype, 21).to(device)
    for rows in (1, 255, 257, 3 * 257):
        x = big[1 : 1 + rows].view(1, rows, 18)  # starts 1 row (18 elements) into the storage
        expected = lfq.lfq_image_ids_reference(x.cpu(), 2, None, 5, 1, 2)
        assert torch.equal(lfq.lfq_image_ids(x, 2, None, 5, 1, 2).cpu(), expected), rows
        x2 = big[1 : 1 + rows].view(rows, 1, 18)
        assert torch.equal(lfq.lfq_image_ids(x2, 2).cpu(), lfq.lfq_image_ids_reference(x2.cpu(), 2)), rows


def test_image_ids_with_other_vocabularies_and_shapes(ext):
    vocab = LibraVocab(text_vocab_size=128, codebook_size=8, image_resolution=3)
    x = _logits((5, 9, 6), torch.bfloat16, 3)
    assert torch.equal(lfq.image_token_ids(x, vocab=vocab), vocab.image_span(lfq.lfq_codes_reference(x, 2).permute(2, 0, 1)))
    empty = torch.zeros(0, 576, 18)
    assert lfq.lfq_image_ids(empty, 2, None, 1, 2, 3).shape == (2, 0, 578)
    no_patches = torch.zeros(2, 0, 18)
    assert torch.equal(lfq.lfq_image_ids(no_patches, 2, None, 0, 5, 6), lfq.lfq_image_ids_reference(no_patches, 2, None, 0, 5, 6))


def test_non_contiguous_input(ext):
    base = _logits((4, 576, 40), torch.float32, 9)
    x = base[..., 3:21]
    assert not x.is_contiguous()
    assert torch.equal(lfq.lfq_image_ids(x, 2, None, 7, 1, 2), lfq.lfq_image_ids_reference(x.contiguous(), 2, None, 7, 1, 2))
    t = base.transpose(0, 1)[..., :18]
    assert torch.equal(lfq.lfq_codes(t, 2), lfq.lfq_codes_reference(t, 2))


def test_reference_used_without_extension(monkeypatch):
    x = _logits((3, 576, 18), torch.float32, 1)
    monkeypatch.setattr(lfq, "get_extension", lambda: None)
    assert torch.equal(lfq.lfq_image_ids(x, 2, None, 1, 2, 3), lfq.lfq_image_ids_reference(x, 2, None, 1, 2, 3))


def test_bad_arguments_are_reported():
    x = torch.zeros(2, 576, 18)
    with pytest.raises(ValueError, match="divisible"):
        lfq.lfq_codes(x, 4)
    with pytest.raises(ValueError, match="both boi_id and eoi_id"):
        lfq.lfq_image_ids(x, 2, None, 0, 5, None)
    with pytest.raises(ValueError, match="bias must be"):
        lfq.lfq_image_ids(x, 2, torch.zeros(17))
    with pytest.raises(ValueError, match=r"\[images, patches"):
        lfq.lfq_image_ids(x[0], 2)
    with pytest.raises(ValueError, match="for this vocabulary"):
        lfq.image_token_ids(torch.zeros(2, 575, 18))
