"""Everything between the q/k/v projections and the attention core, for all sets at once: RoPE on the queries,
the two bridged key/value sets (bridge masks) in sequence order, RoPE on both key sets — one Triton kernel per
direction on GPU, the PyTorch reference elsewhere.

Inputs are the projections as the GEMMs produce them, rows in the modality-sorted order (routing.py):

* ``qkv_text``   ``[n_t, heads, 3, d]`` — megatron's fused ``linear_qkv`` output (per-head ``[q_i; k_i; v_i]``);
* ``qkv_vision`` ``[3, n_v, heads, d]`` — the vision expert's batched B GEMM (q, k, v);
* ``bridge_text`` / ``bridge_vision`` ``[2, n, heads, d]`` — the k and v bridge deltas of each modality.

For sequence row ``p`` (sorted row ``src[p]``, modality ``m(p)``), with ``R`` the RoPE of ``p``'s position::

    keys_for_text[p]    = R(k[p] + [m(p) = vision] Δk[p])     values_for_text[p]    = v[p] + [m(p) = vision] Δv[p]
    keys_for_vision[p]  = R(k[p] + [m(p) = text]   Δk[p])     values_for_vision[p]  = v[p] + [m(p) = text]   Δv[p]
    queries[p]          = R(q[p])

(the bridge delta of a key is added only for queries of the other modality, docs/architecture.md#decoder-layer). Each key/value set is
produced only for its first ``rows_text`` / ``rows_vision`` sequence rows (as far as a query run of that modality
reaches). Queries come back in sorted order (``q_text``, ``q_vision``: the segment path reads runs as views) or,
with ``queries_in_sequence_order``, as one ``[N, heads, d]`` tensor (the index path).

The backward kernel writes the gradients straight into the GEMM outputs' layouts (no unbind/stack copies): every
sorted row is exactly one sequence row, so each gradient element is written once. On the CPU the reference (plain
differentiable torch) runs; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (tests/model/test_fusions.py).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from libra_megatron.model.fusions import rope_reference, triton_usable
from libra_megatron.model.routing import permute_rows

try:  # Triton is a megatron-core dependency; kernels launch only on CUDA tensors (or under TRITON_INTERPRET=1)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

Outputs = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def attention_inputs_reference(
    qkv_text: Tensor, qkv_vision: Tensor, bridge_text: Tensor, bridge_vision: Tensor, seq_to_sorted: Tensor,
    sorted_to_seq: Tensor, cos: Tensor, sin_signed: Tensor, rows_text: int, rows_vision: int,
    queries_in_sequence_order: bool,
) -> Outputs:
    """The PyTorch definition (see the module docstring). ``seq_to_sorted [N]``: sorted row of each sequence row;
    ``sorted_to_seq [N]``: its inverse; ``cos``/``sin_signed`` ``[N, 1, d]`` in sequence order (fusions.py form).

    Returns ``(q_text, q_vision, keys_for_text, values_for_text, keys_for_vision, values_for_vision)``; with
    ``queries_in_sequence_order`` ``q_text`` is all queries ``[N, heads, d]`` and ``q_vision`` is empty.
    """
    n_text = qkv_text.shape[0]
    q_t, k_t, v_t = qkv_text.unbind(2)
    q_v, k_v, v_v = qkv_vision.unbind(0)
    is_vision = (seq_to_sorted >= n_text).view(-1, 1, 1)

    def in_sequence_order(text: Tensor, vision: Tensor) -> Tensor:
        return permute_rows(torch.cat([text, vision]), seq_to_sorted, sorted_to_seq)

    k, v = in_sequence_order(k_t, k_v), in_sequence_order(v_t, v_v)
    dk, dv = in_sequence_order(bridge_text[0], bridge_vision[0]), in_sequence_order(bridge_text[1], bridge_vision[1])
    keys_text = rope_reference(torch.where(is_vision, k + dk, k)[:rows_text], cos[:rows_text], sin_signed[:rows_text])
    values_text = torch.where(is_vision, v + dv, v)[:rows_text]
    keys_vision = rope_reference(torch.where(is_vision, k, k + dk)[:rows_vision], cos[:rows_vision],
                                 sin_signed[:rows_vision])
    values_vision = torch.where(is_vision, v, v + dv)[:rows_vision]
    queries = rope_reference(in_sequence_order(q_t, q_v), cos, sin_signed)
    if queries_in_sequence_order:
        return queries, queries[:0], keys_text, values_text, keys_vision, values_vision
    queries = permute_rows(queries, sorted_to_seq, seq_to_sorted)
    return queries[:n_text], queries[n_text:], keys_text, values_text, keys_vision, values_vision


if triton is not None:

    @triton.jit
    def _load_row(text_ptr, vision_ptr, which, row_t, row_v, is_vision, tw, tr, th, vw, vr, vh, heads, cols, mask):
        """Element [which, row, heads, cols] of the text or the vision tensor (*w/*r/*h: which/row/head strides)."""
        t = tl.load(text_ptr + which * tw + row_t * tr + heads[:, None] * th + cols[None, :],
                    mask=mask & (is_vision == 0), other=0.0).to(tl.float32)
        v = tl.load(vision_ptr + which * vw + row_v * vr + heads[:, None] * vh + cols[None, :],
                    mask=mask & (is_vision != 0), other=0.0).to(tl.float32)
        return t + v

    @triton.jit
    def _store_row(text_ptr, vision_ptr, which, row_t, row_v, is_vision, tw, tr, th, vw, vr, vh, heads, cols, mask,
                   value):
        tl.store(text_ptr + which * tw + row_t * tr + heads[:, None] * th + cols[None, :],
                 value.to(text_ptr.dtype.element_ty), mask=mask & (is_vision == 0))
        tl.store(vision_ptr + which * vw + row_v * vr + heads[:, None] * vh + cols[None, :],
                 value.to(vision_ptr.dtype.element_ty), mask=mask & (is_vision != 0))

    @triton.jit
    def _program_rows(src_ptr, n_text, num_heads, D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        """Where a program (sequence row ``p``, head block) reads and writes: its heads and columns (and the RoPE
        partner columns), the block mask, the row's modality and its row in the text or the vision tensor."""
        p = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        rolled = (cols + HALF) % D
        mask = (heads[:, None] < num_heads) & col_ok[None, :]
        s = tl.load(src_ptr + p).to(tl.int64)
        zero = heads[:, None] * 0 + cols[None, :] * 0  # scalars broadcast to the block (the interpreter needs it)
        is_vision = zero + (s >= n_text).to(tl.int32)
        row = zero + p
        return p, heads, cols, col_ok, rolled, mask, is_vision, s, s - n_text, row

    @triton.jit
    def _attention_inputs_fwd(
        qkv_t, qkv_v, br_t, br_v, src_ptr, cos_ptr, sin_ptr, q_out_t, q_out_v, kt_out, vt_out, kv_out, vv_out,
        qkv_t_s0, qkv_t_s1, qkv_t_s2, qkv_v_s0, qkv_v_s1, qkv_v_s2, br_t_s0, br_t_s1, br_t_s2,
        br_v_s0, br_v_s1, br_v_s2, n_text, num_heads, rows_text, rows_vision,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, Q_SEQ: tl.constexpr,
    ):
        p, heads, cols, col_ok, rolled, mask, is_vision, row_t, row_v, row = _program_rows(
            src_ptr, n_text, num_heads, D, HALF, BLOCK_H, BLOCK_D)
        cos = tl.load(cos_ptr + p * D + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + p * D + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_off = p * num_heads * D + heads[:, None] * D + cols[None, :]
        # queries
        q = _load_row(qkv_t, qkv_v, 0, row_t, row_v, is_vision, qkv_t_s2, qkv_t_s0, qkv_t_s1, qkv_v_s0, qkv_v_s1, qkv_v_s2, heads, cols, mask)
        q_r = _load_row(qkv_t, qkv_v, 0, row_t, row_v, is_vision, qkv_t_s2, qkv_t_s0, qkv_t_s1, qkv_v_s0, qkv_v_s1, qkv_v_s2, heads, rolled, mask)
        q = q * cos + q_r * sin
        if Q_SEQ:
            tl.store(q_out_t + out_off, q.to(q_out_t.dtype.element_ty), mask=mask)
        else:
            _store_row(q_out_t, q_out_v, 0, row_t, row_v, is_vision, 0, num_heads * D, D, 0, num_heads * D, D, heads,
                       cols, mask, q)
        # keys and values, both sets
        k = _load_row(qkv_t, qkv_v, 1, row_t, row_v, is_vision, qkv_t_s2, qkv_t_s0, qkv_t_s1, qkv_v_s0, qkv_v_s1, qkv_v_s2, heads, cols, mask)
        k_r = _load_row(qkv_t, qkv_v, 1, row_t, row_v, is_vision, qkv_t_s2, qkv_t_s0, qkv_t_s1, qkv_v_s0, qkv_v_s1, qkv_v_s2, heads, rolled, mask)
        dk = _load_row(br_t, br_v, 0, row_t, row_v, is_vision, br_t_s0, br_t_s1, br_t_s2, br_v_s0, br_v_s1, br_v_s2, heads, cols, mask)
        dk_r = _load_row(br_t, br_v, 0, row_t, row_v, is_vision, br_t_s0, br_t_s1, br_t_s2, br_v_s0, br_v_s1, br_v_s2, heads, rolled, mask)
        v = _load_row(qkv_t, qkv_v, 2, row_t, row_v, is_vision, qkv_t_s2, qkv_t_s0, qkv_t_s1, qkv_v_s0, qkv_v_s1, qkv_v_s2, heads, cols, mask)
        dv = _load_row(br_t, br_v, 1, row_t, row_v, is_vision, br_t_s0, br_t_s1, br_t_s2, br_v_s0, br_v_s1, br_v_s2, heads, cols, mask)
        vis = is_vision.to(tl.float32)
        # text queries' set bridges vision keys; vision queries' set bridges text keys
        kt = (k + vis * dk) * cos + (k_r + vis * dk_r) * sin
        kv = (k + (1.0 - vis) * dk) * cos + (k_r + (1.0 - vis) * dk_r) * sin
        tl.store(kt_out + out_off, kt.to(kt_out.dtype.element_ty), mask=mask & (row < rows_text))
        tl.store(vt_out + out_off, (v + vis * dv).to(vt_out.dtype.element_ty), mask=mask & (row < rows_text))
        tl.store(kv_out + out_off, kv.to(kv_out.dtype.element_ty), mask=mask & (row < rows_vision))
        tl.store(vv_out + out_off, (v + (1.0 - vis) * dv).to(vv_out.dtype.element_ty), mask=mask & (row < rows_vision))

    @triton.jit
    def _rope_t(g_ptr, off_base, cols, rolled, mask, cos_ptr, sin_ptr, p, D: tl.constexpr, col_ok):
        """Gradient through RoPE: dx_j = g_j c_j + g_r(j) s_r(j)."""
        g = tl.load(g_ptr + off_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g_r = tl.load(g_ptr + off_base + rolled[None, :], mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + p * D + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        sin_r = tl.load(sin_ptr + p * D + rolled, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return g * cos + g_r * sin_r

    @triton.jit
    def _attention_inputs_bwd(
        gq_t, gq_v, gkt, gvt, gkv, gvv, src_ptr, cos_ptr, sin_ptr, dqkv_t, dqkv_v, dbr_t, dbr_v,
        qkv_t_s0, qkv_t_s1, qkv_t_s2, qkv_v_s0, qkv_v_s1, qkv_v_s2, br_t_s0, br_t_s1, br_t_s2,
        br_v_s0, br_v_s1, br_v_s2, n_text, num_heads, rows_text, rows_vision,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, Q_SEQ: tl.constexpr,
    ):
        p, heads, cols, col_ok, rolled, mask, is_vision, row_t, row_v, row = _program_rows(
            src_ptr, n_text, num_heads, D, HALF, BLOCK_H, BLOCK_D)
        head_off = heads[:, None] * D
        seq_base = p * num_heads * D + head_off
        # queries
        if Q_SEQ:
            dq = _rope_t(gq_t, seq_base, cols, rolled, mask, cos_ptr, sin_ptr, p, D, col_ok)
        else:
            dq_t = _rope_t(gq_t, row_t * num_heads * D + head_off, cols, rolled, mask & (is_vision == 0),
                           cos_ptr, sin_ptr, p, D, col_ok)
            dq_v = _rope_t(gq_v, row_v * num_heads * D + head_off, cols, rolled, mask & (is_vision != 0),
                           cos_ptr, sin_ptr, p, D, col_ok)
            dq = dq_t + dq_v
        _store_row(dqkv_t, dqkv_v, 0, row_t, row_v, is_vision, qkv_t_s2, qkv_t_s0, qkv_t_s1, qkv_v_s0, qkv_v_s1, qkv_v_s2, heads, cols, mask, dq)
        # key/value sets (zero beyond a set's rows)
        in_t = mask & (row < rows_text)
        in_v = mask & (row < rows_vision)
        gk_t = _rope_t(gkt, seq_base, cols, rolled, in_t, cos_ptr, sin_ptr, p, D, col_ok)
        gk_v = _rope_t(gkv, seq_base, cols, rolled, in_v, cos_ptr, sin_ptr, p, D, col_ok)
        gv_t = tl.load(gvt + seq_base + cols[None, :], mask=in_t, other=0.0).to(tl.float32)
        gv_v = tl.load(gvv + seq_base + cols[None, :], mask=in_v, other=0.0).to(tl.float32)
        vis = is_vision.to(tl.float32)
        _store_row(dqkv_t, dqkv_v, 1, row_t, row_v, is_vision, qkv_t_s2, qkv_t_s0, qkv_t_s1, qkv_v_s0, qkv_v_s1, qkv_v_s2, heads, cols, mask, gk_t + gk_v)
        _store_row(dqkv_t, dqkv_v, 2, row_t, row_v, is_vision, qkv_t_s2, qkv_t_s0, qkv_t_s1, qkv_v_s0, qkv_v_s1, qkv_v_s2, heads, cols, mask, gv_t + gv_v)
        # a vision row's delta entered the text queries' set, a text row's the vision queries' set
        _store_row(dbr_t, dbr_v, 0, row_t, row_v, is_vision, br_t_s0, br_t_s1, br_t_s2, br_v_s0, br_v_s1, br_v_s2, heads, cols, mask,
                   vis * gk_t + (1.0 - vis) * gk_v)
        _store_row(dbr_t, dbr_v, 1, row_t, row_v, is_vision, br_t_s0, br_t_s1, br_t_s2, br_v_s0, br_v_s1, br_v_s2, heads, cols, mask,
                   vis * gv_t + (1.0 - vis) * gv_v)


def _meta(heads: int, d: int) -> dict:
    block_d = triton.next_power_of_2(d)
    # ~a dozen live [BLOCK_H, BLOCK_D] fp32 tiles per program: keep a tile at <= 1024 elements (register pressure)
    return dict(D=d, HALF=d // 2, BLOCK_D=block_d, BLOCK_H=min(triton.next_power_of_2(heads), max(1, 1024 // block_d)))


def _strides(qkv_text: Tensor, qkv_vision: Tensor, bridge_text: Tensor, bridge_vision: Tensor) -> list:
    return [*qkv_text.stride()[:3], *qkv_vision.stride()[:3], *bridge_text.stride()[:3], *bridge_vision.stride()[:3]]


class _FusedAttentionInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv_text, qkv_vision, bridge_text, bridge_vision, seq_to_sorted, cos, sin, rows_text,
                rows_vision, queries_in_sequence_order):  # type: ignore[override]
        n_text, heads, _, d = qkv_text.shape
        n_vision, n = qkv_vision.shape[1], seq_to_sorted.shape[0]
        new = qkv_text.new_empty
        if queries_in_sequence_order:
            q_t, q_v = new((n, heads, d)), new((0, heads, d))
        else:
            q_t, q_v = new((n_text, heads, d)), new((n_vision, heads, d))
        outs = (q_t, q_v, new((rows_text, heads, d)), new((rows_text, heads, d)), new((rows_vision, heads, d)),
                new((rows_vision, heads, d)))
        meta = _meta(heads, d)
        args = (seq_to_sorted, cos, sin)
        ctx.save_for_backward(seq_to_sorted, cos, sin)
        ctx.shapes = (qkv_text, qkv_vision, bridge_text, bridge_vision)
        ctx.shapes = tuple((t.shape, t.stride(), t.dtype) for t in ctx.shapes)
        ctx.scalars = (n_text, heads, rows_text, rows_vision, queries_in_sequence_order, meta)
        if n:
            grid = (n, triton.cdiv(heads, meta["BLOCK_H"]))
            _attention_inputs_fwd[grid](qkv_text, qkv_vision, bridge_text, bridge_vision, *args, *outs,
                                        *_strides(qkv_text, qkv_vision, bridge_text, bridge_vision), n_text, heads,
                                        rows_text, rows_vision, Q_SEQ=queries_in_sequence_order, **meta)
        return outs

    @staticmethod
    def backward(ctx, gq_t, gq_v, gkt, gvt, gkv, gvv):  # type: ignore[override]
        seq_to_sorted, cos, sin = ctx.saved_tensors
        n_text, heads, rows_text, rows_vision, q_seq, meta = ctx.scalars
        grads = [torch.empty_strided(shape, stride, dtype=dtype, device=cos.device) for shape, stride, dtype in
                 ctx.shapes]
        n = seq_to_sorted.shape[0]
        if n:
            gq_t, gq_v, gkt, gvt, gkv, gvv = (g.contiguous() for g in (gq_t, gq_v, gkt, gvt, gkv, gvv))
            grid = (n, triton.cdiv(heads, meta["BLOCK_H"]))
            _attention_inputs_bwd[grid](gq_t, gq_v, gkt, gvt, gkv, gvv, seq_to_sorted, cos, sin, *grads,
                                        *_strides(*grads), n_text, heads, rows_text, rows_vision, Q_SEQ=q_seq,
                                        **meta)
        return (*grads, None, None, None, None, None, None)


def attention_inputs(
    qkv_text: Tensor, qkv_vision: Tensor, bridge_text: Tensor, bridge_vision: Tensor, seq_to_sorted: Tensor,
    sorted_to_seq: Tensor, cos: Tensor, sin_signed: Tensor, rows_text: int, rows_vision: int,
    queries_in_sequence_order: bool = False,
) -> Outputs:
    """Queries and both bridged key/value sets (see the module docstring and :func:`attention_inputs_reference`):
    the fused kernels on CUDA (or under ``TRITON_INTERPRET=1``), the reference elsewhere."""
    tensors = (qkv_text, qkv_vision, bridge_text, bridge_vision)
    d = qkv_text.shape[-1]
    if not triton_usable(*tensors) or d % 2 or any(t.stride(-1) != 1 for t in tensors):
        return attention_inputs_reference(qkv_text, qkv_vision, bridge_text, bridge_vision, seq_to_sorted,
                                          sorted_to_seq, cos, sin_signed, rows_text, rows_vision,
                                          queries_in_sequence_order)
    n = seq_to_sorted.shape[0]
    return _FusedAttentionInputs.apply(qkv_text, qkv_vision, bridge_text, bridge_vision, seq_to_sorted,
                                       cos.reshape(n, d).contiguous(), sin_signed.reshape(n, d).contiguous(),
                                       rows_text, rows_vision, queries_in_sequence_order)
