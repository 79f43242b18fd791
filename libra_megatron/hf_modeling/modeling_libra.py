"""Hugging Face ``LibraForCausalLM``, shipped inside every libra-megatron export (docs/architecture.md: the model
from #sequence-and-routing to #output-heads, the #loss and the #hf-state-dict).

Self-contained: imports only ``torch`` and ``transformers`` (plus its sibling files ``configuration_libra.py``,
``cache_libra.py`` and ``generation_libra.py``), so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works without
libra-megatron installed. The state dict has exactly the 1,103 released keys (buffers included).

Inputs (as the reference):
    input_ids        long [C=2, B, L]  one id plane per codebook (text ids equal in both planes); a 2-D [B, L]
                                       text-only tensor is accepted and copied to both planes
    vision_indices   long [B, L]       0..577 inside an image, 578 (= max_vision_token_length) on text
    contiguous_signal float [B, L, 4096] CLIP features at patch positions, zeros elsewhere (None = zeros). The
                                       reference spells this key ``coninous_signal``; that name is accepted too.
Output ``logits`` is [C, B, L, V_text + V_vis] with -inf blocks, like the reference; ``loss`` is docs/architecture.md#loss.
The KV cache (:class:`LibraCache`, ``cache_libra.py``) keeps, per layer, the keys and values as seen by text queries and by vision
queries (the bridge deltas are already added), plus the modality history.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .cache_libra import LibraCache
from .configuration_libra import LibraConfig
from .generation_libra import libra_generate


@dataclass
class LibraCausalLMOutputWithPast(ModelOutput):
    """Loss (docs/architecture.md#loss), logits [C, B, L, V_text+V_vis], the cache, and optionally all hidden states."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    cache: Optional["LibraCache"] = None  # transformers >= 5 name; ``past_key_values`` reads the same object
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[Tuple[torch.FloatTensor, ...]] = None

    @property
    def past_key_values(self) -> Optional["LibraCache"]:
        return self.cache


class _Routing:
    """Text rows and vision rows of one forward, computed once and used by every routed op (docs/architecture.md#sequence-and-routing)."""

    def __init__(self, vision_flag: torch.Tensor) -> None:
        self.flag = vision_flag
        flat = vision_flag.reshape(-1)
        self.rows = flat.numel()
        self.vision_rows = flat.nonzero().squeeze(1)
        self.text_rows = (~flat).nonzero().squeeze(1)
        self.has_vision = self.vision_rows.numel() > 0
        self.has_text = self.text_rows.numel() > 0

    def apply(self, x: torch.Tensor, text_fn: Callable, vision_fn: Callable) -> torch.Tensor:
        """``where(vision_flag, vision_fn(x), text_fn(x))``, computing each function only on its own rows."""
        if not self.has_vision:
            return text_fn(x)
        if not self.has_text:
            return vision_fn(x)
        lead = x.shape[:-1]
        flat = x.reshape(self.rows, x.shape[-1])
        text = text_fn(flat.index_select(0, self.text_rows))
        vision = vision_fn(flat.index_select(0, self.vision_rows))
        out = text.new_empty((self.rows, text.shape[-1]))
        out = out.index_copy(0, self.text_rows, text).index_copy(0, self.vision_rows, vision.to(text.dtype))
        return out.view(*lead, -1)


class LibraRMSNorm(nn.Module):
    """LLaMA RMSNorm (fp32 statistics, weight applied in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LibraLinear(nn.Module):
    """Factorised expert ``y = B(Ax)`` (docs/architecture.md#low-rank-expert): ``weight_A`` [rank, in] is applied first, ``weight_B`` [out, rank]."""

    def __init__(self, in_features: int, out_features: int, rank: int, is_bridge: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.is_bridge = in_features, out_features, rank, is_bridge
        self.weight_A = nn.Parameter(torch.empty(rank, in_features))
        self.weight_B = nn.Parameter(torch.empty(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_A), self.weight_B)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LibraRotaryEmbedding(nn.Module):
    """RoPE (HF ``rotate_half`` layout). ``inv_freq`` is a persistent buffer only because the released state dict has
    it; cos/sin are always built from a fresh fp32 ``inv_freq`` (the reference's fp32 cos/sin cache, docs/architecture.md#positions)."""

    def __init__(self, dim: int, base: float) -> None:
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)

    def compute_inv_freq(self, device: Optional[torch.device] = None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.compute_inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, L, D]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class LibraAttention(nn.Module):
    """Routed Q/K/V/O with the cross-modal K/V bridge and one softmax over all keys (docs/architecture.md#decoder-layer)."""

    def __init__(self, config: LibraConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.use_bridge = config.use_bridge
        self.attn_pdrop = config.attn_pdrop
        self.resid_pdrop, self.vision_resid_pdrop = config.resid_pdrop, config.vision_resid_pdrop
        self.config = config
        h, inner, ratio = config.hidden_size, self.num_heads * self.head_dim, config.vision_down_ratio
        self.q_proj = nn.Linear(h, inner, bias=False)
        self.k_proj = nn.Linear(h, inner, bias=False)
        self.v_proj = nn.Linear(h, inner, bias=False)
        self.o_proj = nn.Linear(inner, h, bias=False)
        self.rotary_emb = LibraRotaryEmbedding(self.head_dim, config.rope_theta)
        self.vision_q_proj = LibraLinear(h, inner, inner // ratio)
        self.vision_k_proj = LibraLinear(h, inner, inner // ratio)
        self.vision_v_proj = LibraLinear(h, inner, inner // ratio)
        self.vision_o_proj = LibraLinear(inner, h, h // ratio)
        if self.use_bridge:
            for name in ("vision_v_bridge_on_language", "vision_v_bridge_on_vision",
                         "vision_k_bridge_on_language", "vision_k_bridge_on_vision"):
                setattr(self, name, LibraLinear(h, inner, config.bridge_rank, is_bridge=True))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        return x.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, bias: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
        dropout = self.attn_pdrop if self.training else 0.0
        if getattr(self.config, "_attn_implementation", None) == "eager":  # the reference's exact op order (L363-391)
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
            if bias is None and causal:
                bias = _causal_bias(q.shape[2], k.shape[2], None, q.dtype, q.device)
            if bias is not None:
                scores = torch.max(scores + bias, torch.tensor(torch.finfo(scores.dtype).min, device=scores.device))
            probs = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), dropout, self.training)
            return torch.matmul(probs, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=causal and bias is None)

    def forward(self, hidden: torch.Tensor, routing: _Routing, cos: torch.Tensor, sin: torch.Tensor,
                bias: Optional[torch.Tensor], causal: bool, cache: Optional[LibraCache]) -> torch.Tensor:
        b, l, _ = hidden.shape
        q = self._heads(routing.apply(hidden, self.q_proj, self.vision_q_proj))
        k = routing.apply(hidden, self.k_proj, self.vision_k_proj)
        v = routing.apply(hidden, self.v_proj, self.vision_v_proj)
        need_text = routing.has_text or cache is not None
        need_vision = routing.has_vision or cache is not None
        k_text = k_vision = k
        v_text = v_vision = v
        if self.use_bridge:  # a query of modality a sees k_j + 1[m_j != a] * dk_j (dk from j's own bridge)
            dk = routing.apply(hidden, self.vision_k_bridge_on_language, self.vision_k_bridge_on_vision)
            dv = routing.apply(hidden, self.vision_v_bridge_on_language, self.vision_v_bridge_on_vision)
            if not routing.has_vision:  # text positions only (e.g. decoding text): no select needed
                k_vision, v_vision = (k + dk, v + dv) if need_vision else (k, v)
            elif not routing.has_text:
                k_text, v_text = (k + dk, v + dv) if need_text else (k, v)
            else:
                flag = routing.flag.unsqueeze(-1)
                if need_text:
                    k_text, v_text = torch.where(flag, k + dk, k), torch.where(flag, v + dv, v)
                if need_vision:
                    k_vision, v_vision = torch.where(flag, k, k + dk), torch.where(flag, v, v + dv)
        q = _rope(q, cos, sin)
        k_text = _rope(self._heads(k_text), cos, sin)
        k_vision = k_text if k_vision is k else _rope(self._heads(k_vision), cos, sin)
        v_text, v_vision = self._heads(v_text), self._heads(v_vision)
        if cache is not None:
            k_text, k_vision, v_text, v_vision = cache.update(self.layer_idx, k_text, k_vision, v_text, v_vision)
        out_text = self._attend(q, k_text, v_text, bias, causal) if routing.has_text else None
        out_vision = self._attend(q, k_vision, v_vision, bias, causal) if routing.has_vision else None
        if out_text is None:
            out = out_vision
        elif out_vision is None:
            out = out_text
        else:
            out = torch.where(routing.flag[:, None, :, None], out_vision, out_text)
        out = out.transpose(1, 2).reshape(b, l, -1)
        return routing.apply(
            out,
            lambda x: F.dropout(self.o_proj(x), self.resid_pdrop, self.training),
            lambda x: F.dropout(self.vision_o_proj(x), self.vision_resid_pdrop, self.training),
        )


class LibraMLP(nn.Module):
    """Routed SwiGLU: LLaMA's gate/up/down for text, low-rank experts for vision."""

    def __init__(self, config: LibraConfig) -> None:
        super().__init__()
        h, f, ratio = config.hidden_size, config.intermediate_size, config.vision_down_ratio
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.vision_gate_proj = LibraLinear(h, f, f // ratio)
        self.vision_down_proj = LibraLinear(f, h, h // ratio)
        self.vision_up_proj = LibraLinear(h, f, f // ratio)
        self.act_fn = ACT2FN[config.hidden_act]
        self.resid_pdrop, self.vision_resid_pdrop = config.resid_pdrop, config.vision_resid_pdrop

    def forward(self, x: torch.Tensor, routing: _Routing) -> torch.Tensor:
        return routing.apply(
            x,
            lambda t: F.dropout(self.down_proj(self.act_fn(self.gate_proj(t)) * self.up_proj(t)), self.resid_pdrop, self.training),
            lambda t: F.dropout(self.vision_down_proj(self.act_fn(self.vision_gate_proj(t)) * self.vision_up_proj(t)),
                                self.vision_resid_pdrop, self.training),
        )


class LibraDecoderLayer(nn.Module):
    """Routed pre-norm decoder layer (docs/architecture.md#decoder-layer)."""

    def __init__(self, config: LibraConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LibraAttention(config, layer_idx)
        self.mlp = LibraMLP(config)
        self.input_layernorm = LibraRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LibraRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision_input_layernorm = LibraRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision_post_attention_layernorm = LibraRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, routing, cos, sin, bias, causal, cache):
        h = routing.apply(x, self.input_layernorm, self.vision_input_layernorm)
        x = x + self.self_attn(h, routing, cos, sin, bias, causal, cache)
        h = routing.apply(x, self.post_attention_layernorm, self.vision_post_attention_layernorm)
        return x + self.mlp(h, routing)


def _causal_bias(q_len: int, kv_len: int, attention_mask: Optional[torch.Tensor], dtype, device) -> torch.Tensor:
    """Additive [B or 1, 1, q_len, kv_len] mask: 0 where allowed, finfo.min elsewhere (causal + key padding)."""
    past = kv_len - q_len
    allowed = torch.arange(q_len, device=device)[:, None] + past >= torch.arange(kv_len, device=device)[None, :]
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_len].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class LibraPreTrainedModel(PreTrainedModel):
    """Weight init of new parameters (docs/architecture.md#initialisation) and HF plumbing."""

    config_class = LibraConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LibraDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, LibraLinear):  # experts: A, B ~ N(0, std); bridges: A ~ N(0, std), B = 0
            nn.init.normal_(module.weight_A, mean=0.0, std=std)
            if module.is_bridge:
                nn.init.zeros_(module.weight_B)
            else:
                nn.init.normal_(module.weight_B, mean=0.0, std=std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, LibraRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LibraRotaryEmbedding):
            _fill_buffer(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, LibraForCausalLM):
            nn.init.normal_(module.vision_hidden_placeholder, mean=0.0, std=std)
            for name, value in module.placeholder_values().items():
                _fill_buffer(getattr(module, name), value)


def _fill_buffer(buffer: torch.Tensor, value: torch.Tensor) -> None:
    if buffer.device.type != "meta" and not getattr(buffer, "_is_hf_initialized", False):
        buffer.copy_(value.to(buffer.device, buffer.dtype))


class LibraModel(LibraPreTrainedModel):
    """Embeddings (text + hybrid vision input, docs/architecture.md#input-embedding), decoder layers and the routed final norm."""

    def __init__(self, config: LibraConfig) -> None:
        super().__init__(config)
        config.validate_libra()
        h = config.hidden_size
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h, self.padding_idx)
        self.layers = nn.ModuleList([LibraDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LibraRMSNorm(h, config.rms_norm_eps)
        self.vision_embed_tokens = nn.ModuleList(
            [nn.Embedding(config.vision_vocab_size, h // config.vision_codebook_num) for _ in range(config.vision_codebook_num)]
        )
        self.vision_norm = LibraRMSNorm(h, config.rms_norm_eps)
        self.vision_contiguous_signal_processor = nn.Linear(config.contiguous_signal_size + h, h, bias=False)
        self.vision_signal_norm = LibraRMSNorm(config.contiguous_signal_size + h, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed(self, input_ids: torch.Tensor, routing: _Routing, contiguous_signal: Optional[torch.Tensor]) -> torch.Tensor:
        """Text: ``embed_tokens``; vision: ``W_sig RMSNorm([E0[id0] || E1[id1] || clip])`` (zeros without a signal)."""
        cfg = self.config
        c, b, l = input_ids.shape
        flat = input_ids.reshape(c, b * l)

        def text(_rows_unused):
            ids = flat[0] if not routing.has_vision else flat[0].index_select(0, routing.text_rows)
            return self.embed_tokens(ids)

        def vision(_rows_unused):
            rows = routing.vision_rows
            codes = flat.index_select(1, rows) - self.vocab_size
            parts = [self.vision_embed_tokens[i](codes[i]) for i in range(c)]
            if contiguous_signal is None:
                signal = parts[0].new_zeros(rows.numel(), cfg.contiguous_signal_size)
            else:
                signal = contiguous_signal.reshape(b * l, -1).index_select(0, rows).to(parts[0].dtype)
            fused = self.vision_signal_norm(torch.cat(parts + [signal], dim=-1))
            return self.vision_contiguous_signal_processor(fused)

        placeholder = torch.empty(b, l, 1, device=input_ids.device)
        embeds = routing.apply(placeholder, text, vision)
        return embeds.view(b, l, -1)

    def forward(self, input_ids: torch.Tensor, vision_flag: torch.Tensor, attention_mask=None, position_ids=None,
                past_key_values: Optional[LibraCache] = None, use_cache: bool = False,
                contiguous_signal=None, output_hidden_states: bool = False, validate: bool = True):
        """Return (last hidden state after the routed final norm, cache, all hidden states or None)."""
        cfg = self.config
        if validate:
            _check_ids(input_ids, vision_flag, cfg)
        b, l = vision_flag.shape
        cache = past_key_values
        if use_cache and cache is None:
            cache = LibraCache(cfg.num_hidden_layers)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + l, device=input_ids.device).unsqueeze(0).expand(b, l)
        routing = _Routing(vision_flag)
        x = self.embed(input_ids, routing, contiguous_signal)
        if self.training and (cfg.embd_pdrop or cfg.vision_embd_pdrop):
            x = routing.apply(x, lambda t: F.dropout(t, cfg.embd_pdrop, True), lambda t: F.dropout(t, cfg.vision_embd_pdrop, True))
        simple_causal = attention_mask is None or bool(attention_mask[:, : past + l].all())
        bias = None if (simple_causal and past == 0) else _causal_bias(
            l, past + l, None if simple_causal else attention_mask, x.dtype, x.device)
        cos, sin = self.layers[0].self_attn.rotary_emb(position_ids, x.dtype) if len(self.layers) else (None, None)
        hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, routing, cos, sin, bias, True, None, use_reentrant=False)
            else:
                x = layer(x, routing, cos, sin, bias, True, cache)
        if cache is not None:
            cache.append_modality(vision_flag)
        x = routing.apply(x, self.norm, self.vision_norm)
        if hidden_states is not None:
            hidden_states.append(x)
        return x, cache, (tuple(hidden_states) if hidden_states is not None else None)


def _check_ids(input_ids: torch.Tensor, vision_flag: torch.Tensor, cfg: LibraConfig) -> None:
    """Clear errors instead of device-side asserts: ids and ``vision_indices`` must agree (reference L708-711)."""
    if input_ids.dim() != 3 or input_ids.shape[0] != cfg.vision_codebook_num:
        raise ValueError(f"input_ids must be [{cfg.vision_codebook_num}, B, L], got {tuple(input_ids.shape)}")
    if tuple(vision_flag.shape) != tuple(input_ids.shape[1:]):
        raise ValueError(f"vision_indices must be [B, L] = {tuple(input_ids.shape[1:])}, got {tuple(vision_flag.shape)}")
    is_image_id = input_ids >= cfg.vocab_size
    if not torch.equal(is_image_id, vision_flag.unsqueeze(0).expand_as(is_image_id)):
        raise ValueError("input_ids and vision_indices disagree: image ids (>= vocab_size) must sit exactly where "
                         f"vision_indices < {cfg.max_vision_token_length}, in every plane")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size + cfg.vision_vocab_size):
        raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size + cfg.vision_vocab_size}), got "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")


class LibraForCausalLM(LibraPreTrainedModel, GenerationMixin):
    """Libra decoder with the text head, the two codebook heads and the released buffers (docs/architecture.md#output-heads, docs/architecture.md#hf-state-dict)."""

    def __init__(self, config: LibraConfig) -> None:
        super().__init__(config)
        self.model = LibraModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vision_lm_head = _MultiHead(config.vision_codebook_num, config.hidden_size, config.vision_vocab_size)
        self.vision_hidden_placeholder = nn.Parameter(torch.empty(config.hidden_size))
        for name, value in self.placeholder_values().items():
            self.register_buffer(name, value, persistent=True)
        self.post_init()

    def placeholder_values(self) -> dict:
        """The released constant buffers: zeros, the -inf logit blocks, the forced-newline row (docs/architecture.md#hf-state-dict)."""
        cfg = self.config
        eoi = torch.full((1, 1, 1, cfg.vocab_size + cfg.vision_vocab_size), -float("inf"))
        eoi[..., cfg.newline_token_id] = float("inf")
        return {
            "naive_placeholder": torch.zeros(cfg.hidden_size),
            "vision_logits_placeholder": torch.full((1, cfg.vision_vocab_size), -float("inf")),
            "language_logits_placeholder": torch.full((1, cfg.vocab_size), -float("inf")),
            "eoi_to_newline_logits_placeholder": eoi,
        }

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> LibraModel:
        return self.model

    def compute_logits(self, hidden: torch.Tensor, vision_flag: torch.Tensor) -> torch.Tensor:
        """[C, B, L, V_text + V_vis]: text head on text rows, head ``c`` on vision rows of plane ``c``, -inf elsewhere."""
        cfg = self.config
        b, l, d = hidden.shape
        flat, flag = hidden.reshape(b * l, d), vision_flag.reshape(-1)
        logits = hidden.new_full((cfg.vision_codebook_num, b * l, cfg.vocab_size + cfg.vision_vocab_size), -float("inf"))
        text_rows, vision_rows = (~flag).nonzero().squeeze(1), flag.nonzero().squeeze(1)
        if text_rows.numel():
            text = self.lm_head(flat.index_select(0, text_rows))
            logits[:, text_rows, : cfg.vocab_size] = text.unsqueeze(0).expand(cfg.vision_codebook_num, -1, -1)
        if vision_rows.numel():
            vision = flat.index_select(0, vision_rows)
            for c, head in enumerate(self.vision_lm_head.heads):
                logits[c, vision_rows, cfg.vocab_size:] = head(vision)
        return logits.view(cfg.vision_codebook_num, b, l, -1)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[LibraCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        vision_indices: Optional[torch.LongTensor] = None,
        contiguous_signal: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """Forward (docs/architecture.md#sequence-and-routing to docs/architecture.md#output-heads); with ``labels`` [C, B, L] (unshifted, HF convention) also the docs/architecture.md#loss loss."""
        cfg = self.config
        if contiguous_signal is None:
            contiguous_signal = kwargs.pop("coninous_signal", None)  # the reference's key name
        if past_key_values is None:
            past_key_values = kwargs.pop("cache", None)  # transformers >= 5.x name
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("LibraForCausalLM takes input_ids (two id planes), not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if input_ids.dim() == 2:
            input_ids = input_ids.unsqueeze(0).expand(cfg.vision_codebook_num, -1, -1)
        if vision_indices is None:
            vision_flag = input_ids[0] >= cfg.vocab_size
        else:
            vision_flag = vision_indices < cfg.max_vision_token_length
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if self.training:
            use_cache = False
        hidden, cache, all_hidden = self.model(
            input_ids, vision_flag, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, contiguous_signal=contiguous_signal,
            output_hidden_states=bool(output_hidden_states), validate=not kwargs.pop("_ids_checked", False),
        )
        if logits_to_keep and labels is None:
            hidden, vision_flag = hidden[:, -logits_to_keep:], vision_flag[:, -logits_to_keep:]
        logits = self.compute_logits(hidden, vision_flag)
        loss = self.loss_from_logits(logits, labels) if labels is not None else None
        if return_dict is False:
            return tuple(v for v in (loss, logits, cache, all_hidden) if v is not None)
        return LibraCausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, hidden_states=all_hidden)

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """docs/architecture.md#loss: mean over the C planes of the token-mean CE of ``logits[c, :, :-1]`` against ``labels[c, :, 1:]``."""
        c = logits.shape[0]
        if labels.dim() == 2:
            labels = labels.unsqueeze(0).expand(c, -1, -1)
        if labels.shape != logits.shape[:-1]:
            raise ValueError(f"labels must be [C, B, L] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
        total = logits.new_zeros((), dtype=torch.float32)
        for plane in range(c):
            shift_logits = logits[plane, :, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[plane, :, 1:].reshape(-1).to(shift_logits.device)
            total = total + F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return total / c

    def prepare_inputs_for_generation(self, *args, **kwargs):  # pragma: no cover - generate() is overridden
        raise NotImplementedError("LibraForCausalLM.generate has its own two-plane decoding loop")

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.LongTensor] = None, generation_config=None, **kwargs):
        """Greedy, sampling (temperature/top-k/top-p/repetition penalty per id plane) or beam search; see
        ``generation_libra.libra_generate`` for the arguments. Returns ids [C, B, L+T] (or [B, L+T] for 2-D input)."""
        return libra_generate(self, input_ids, generation_config=generation_config, **kwargs)


class _MultiHead(nn.Module):
    """One 514-way head per codebook (``vision_lm_head.heads.{c}``)."""

    def __init__(self, heads: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(hidden, classes, bias=False) for _ in range(heads)])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [head(x) for head in self.heads]
