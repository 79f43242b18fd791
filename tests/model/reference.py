"""An independent eager Libra forward, written from docs/architecture.md#input-embedding to docs/architecture.md#output-heads and docs/architecture.md#loss (it shares no code with the engine).

Weights are the HF Libra tensors by name. Routing is by boolean masks (both branches on every row, then
``where``), attention builds the two full score matrices (keys/values for vision queries and for text queries)
and keeps each query row's own one, exactly as the reference implementation does.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _lowrank(x: Tensor, w: Dict[str, Tensor], name: str) -> Tensor:
    return (x @ w[name + ".weight_A"].t()) @ w[name + ".weight_B"].t()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """x [B, H, L, d], positions [B, L]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    freqs = positions.float()[..., None] * inv_freq  # [B, L, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, L, d]
    return x * emb.cos() + _rotate_half(x) * emb.sin()


def reference_logits(
    w: Dict[str, Tensor], cfg: dict, tokens: Tensor, vision_indices: Tensor, position_ids: Tensor,
    clip_features: Optional[Tensor], attention_mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
) -> Tensor:
    """Unified logits ``[C, B, L, T + K + 2]`` of the Libra forward. ``cfg``: plain dict of sizes."""
    T, K2, C = cfg["text_vocab"], cfg["vision_vocab"], cfg["codebooks"]
    H, eps, base, P = cfg["heads"], cfg["eps"], cfg["rope_base"], cfg["patches"]
    B, L = vision_indices.shape
    vf = vision_indices < cfg["image_positions"]  # [B, L] vision rows
    col = vf[..., None]

    # docs/architecture.md#input-embedding input embedding
    text_emb = w["model.embed_tokens.weight"][tokens[0].clamp(0, T - 1)]
    codes = [(tokens[c] - T).clamp(0, K2 - 1) for c in range(C)]
    discrete = torch.cat([w[f"model.vision_embed_tokens.{c}.weight"][codes[c]] for c in range(C)], dim=-1)
    feats = torch.zeros(B, L, cfg["clip"])
    if clip_features is not None:
        image = -1
        for b in range(B):
            for t in range(L):
                index = int(vision_indices[b, t])
                if index == 0:
                    image += 1
                if 1 <= index <= P:
                    feats[b, t] = clip_features[image, index - 1]
    signal = _rms(torch.cat([discrete, feats], dim=-1), w["model.vision_signal_norm.weight"], eps)
    vision_emb = signal @ w["model.vision_contiguous_signal_processor.weight"].t()
    x = torch.where(col, vision_emb, text_emb)

    # attention mask [B, 1, Lq, Lk]: causal, real keys, same packed sample
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None].expand(B, L, L).clone()
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = allowed[:, None]

    def heads(t: Tensor) -> Tensor:
        return t.view(B, L, H, -1).transpose(1, 2)

    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        h = torch.where(col, _rms(x, w[p + "vision_input_layernorm.weight"], eps), _rms(x, w[p + "input_layernorm.weight"], eps))
        q = torch.where(col, _lowrank(h, w, a + "vision_q_proj"), h @ w[a + "q_proj.weight"].t())
        k = torch.where(col, _lowrank(h, w, a + "vision_k_proj"), h @ w[a + "k_proj.weight"].t())
        v = torch.where(col, _lowrank(h, w, a + "vision_v_proj"), h @ w[a + "v_proj.weight"].t())
        dk = torch.where(col, _lowrank(h, w, a + "vision_k_bridge_on_vision"), _lowrank(h, w, a + "vision_k_bridge_on_language"))
        dv = torch.where(col, _lowrank(h, w, a + "vision_v_bridge_on_vision"), _lowrank(h, w, a + "vision_v_bridge_on_language"))
        key_v = k + (~col) * dk  # keys seen by vision queries: bridge on text keys
        key_t = k + col * dk  # keys seen by text queries: bridge on vision keys
        value_v, value_t = v + (~col) * dv, v + col * dv
        qh = _rope(heads(q), position_ids, base)
        scores_v = qh @ _rope(heads(key_v), position_ids, base).transpose(-1, -2) / math.sqrt(qh.shape[-1])
        scores_t = qh @ _rope(heads(key_t), position_ids, base).transpose(-1, -2) / math.sqrt(qh.shape[-1])
        minimum = torch.finfo(scores_v.dtype).min
        probs_v = torch.softmax(scores_v.masked_fill(~allowed, minimum).float(), dim=-1)
        probs_t = torch.softmax(scores_t.masked_fill(~allowed, minimum).float(), dim=-1)
        out_v = (probs_v @ heads(value_v)).transpose(1, 2).reshape(B, L, -1)
        out_t = (probs_t @ heads(value_t)).transpose(1, 2).reshape(B, L, -1)
        o = torch.where(col, out_v, out_t)
        x = x + torch.where(col, _lowrank(o, w, a + "vision_o_proj"), o @ w[a + "o_proj.weight"].t())
        m = p + "mlp."
        g = torch.where(col, _rms(x, w[p + "vision_post_attention_layernorm.weight"], eps),
                        _rms(x, w[p + "post_attention_layernorm.weight"], eps))
        text_mlp = (F.silu(g @ w[m + "gate_proj.weight"].t()) * (g @ w[m + "up_proj.weight"].t())) @ w[m + "down_proj.weight"].t()
        vision_mlp = _lowrank(F.silu(_lowrank(g, w, m + "vision_gate_proj")) * _lowrank(g, w, m + "vision_up_proj"), w,
                              m + "vision_down_proj")
        x = x + torch.where(col, vision_mlp, text_mlp)

    # docs/architecture.md#output-heads routed final norm and heads, −inf blocks
    hfin = torch.where(col, _rms(x, w["model.vision_norm.weight"], eps), _rms(x, w["model.norm.weight"], eps))
    text_logits = hfin @ w["lm_head.weight"].t()
    planes = []
    for c in range(C):
        vision_logits = hfin @ w[f"vision_lm_head.heads.{c}.weight"].t()
        text_row = torch.cat([text_logits, torch.full((B, L, K2), float("-inf"))], dim=-1)
        vision_row = torch.cat([torch.full((B, L, T), float("-inf")), vision_logits], dim=-1)
        planes.append(torch.where(col, vision_row, text_row))
    return torch.stack(planes)


def reference_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """docs/architecture.md#loss times N_valid: ``(1/C) Σ_c Σ_positions CE`` over non-ignored positions (labels already shifted)."""
    C, V = logits.shape[0], logits.shape[-1]
    total = 0.0
    for c in range(C):
        total = total + F.cross_entropy(logits[c].reshape(-1, V), labels[c].reshape(-1), ignore_index=IGNORE,
                                        reduction="sum")
    return total / C
