"""HF ``LibraForCausalLM``: released keys/shapes (docs/architecture.md#hf-state-dict), the forward against the spec formulas (docs/architecture.md#input-embedding to docs/architecture.md#output-heads), the
loss (docs/architecture.md#loss), the KV cache, text-only equality with transformers' LLaMA, and self-containment of the shipped files."""
from __future__ import annotations

import ast
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from libra_megatron.hf_modeling.configuration_libra import LibraConfig
from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM
from tests.fixtures import LIBRA_7B_SHAPES_JSON
from tests.hf_modeling.tiny import IMAGE_LEN, TEXT_VOCAB, mixed_batch, tiny_config, tiny_model


def _shapes_file() -> str:
    return LIBRA_7B_SHAPES_JSON


def test_7b_meta_model_has_exactly_the_released_keys_and_shapes():
    with torch.device("meta"):
        model = LibraForCausalLM(LibraConfig())
    with open(_shapes_file()) as handle:
        released = json.load(handle)
    state = model.state_dict()
    assert len(state) == 1103
    assert set(state) == set(released), set(state) ^ set(released)
    wrong = {k: (list(v.shape), released[k]) for k, v in state.items() if list(v.shape) != released[k]}
    assert not wrong, wrong
    assert sum(p.numel() for p in model.parameters()) == 11_015_860_224


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _low_rank(x, module):
    return x @ module.weight_A.T @ module.weight_B.T


def _spec_forward(model: LibraForCausalLM, ids, vi, signal):
    """docs/architecture.md#input-embedding to docs/architecture.md#output-heads written densely: both modality versions everywhere, selected with ``where``; the attention is
    the reference's two full score matrices (one per query modality)."""
    cfg = model.config
    m = model.model
    flag = (vi < cfg.max_vision_token_length)[..., None]
    text = m.embed_tokens(ids[0].clamp(max=cfg.vocab_size - 1))
    codes = (ids - cfg.vocab_size).clamp(min=0)
    discrete = torch.cat([m.vision_embed_tokens[c](codes[c]) for c in range(2)], dim=-1)
    vision = m.vision_contiguous_signal_processor(_rms(torch.cat([discrete, signal], -1), m.vision_signal_norm.weight, cfg.rms_norm_eps))
    x = torch.where(flag, vision, text)
    b, l, d = x.shape
    h_, dh = cfg.num_attention_heads, d // cfg.num_attention_heads
    pos = torch.arange(l, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, dh, 2).float() / dh))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = ang.cos(), ang.sin()

    def rope(t):  # [b, h, l, dh]
        return t * cos + torch.cat([-t[..., dh // 2:], t[..., : dh // 2]], -1) * sin

    def heads(t):
        return t.view(b, l, h_, dh).transpose(1, 2)

    causal = torch.ones(l, l, dtype=torch.bool).tril()
    for layer in m.layers:
        a = layer.self_attn
        hn = torch.where(flag, _rms(x, layer.vision_input_layernorm.weight, cfg.rms_norm_eps),
                         _rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps))
        q = torch.where(flag, _low_rank(hn, a.vision_q_proj), hn @ a.q_proj.weight.T)
        k = torch.where(flag, _low_rank(hn, a.vision_k_proj), hn @ a.k_proj.weight.T)
        v = torch.where(flag, _low_rank(hn, a.vision_v_proj), hn @ a.v_proj.weight.T)
        dk = torch.where(flag, _low_rank(hn, a.vision_k_bridge_on_vision), _low_rank(hn, a.vision_k_bridge_on_language))
        dv = torch.where(flag, _low_rank(hn, a.vision_v_bridge_on_vision), _low_rank(hn, a.vision_v_bridge_on_language))
        outs = {}
        for query_is_vision in (False, True):
            other = flag if not query_is_vision else ~flag  # keys of the other modality get the bridge
            kk = rope(heads(torch.where(other, k + dk, k)))
            vv = heads(torch.where(other, v + dv, v))
            s = rope(heads(q)) @ kk.transpose(-1, -2) / math.sqrt(dh)
            s = s.masked_fill(~causal, float("-inf"))
            outs[query_is_vision] = (s.softmax(-1) @ vv).transpose(1, 2).reshape(b, l, d)
        o = torch.where(flag, outs[True], outs[False])
        x = x + torch.where(flag, _low_rank(o, a.vision_o_proj), o @ a.o_proj.weight.T)
        g = torch.where(flag, _rms(x, layer.vision_post_attention_layernorm.weight, cfg.rms_norm_eps),
                        _rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps))
        mlp = layer.mlp
        t_out = (F.silu(g @ mlp.gate_proj.weight.T) * (g @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        v_out = _low_rank(F.silu(_low_rank(g, mlp.vision_gate_proj)) * _low_rank(g, mlp.vision_up_proj), mlp.vision_down_proj)
        x = x + torch.where(flag, v_out, t_out)
    x = torch.where(flag, _rms(x, m.vision_norm.weight, cfg.rms_norm_eps), _rms(x, m.norm.weight, cfg.rms_norm_eps))
    neg = torch.full((b, l, cfg.vision_vocab_size), float("-inf"))
    text_logits = torch.cat([x @ model.lm_head.weight.T, neg], -1)
    planes = []
    for c in range(2):
        vis_logits = torch.cat([torch.full((b, l, cfg.vocab_size), float("-inf")), x @ model.vision_lm_head.heads[c].weight.T], -1)
        planes.append(torch.where(flag, vis_logits, text_logits))
    return torch.stack(planes)


def test_forward_matches_spec_formulas_on_mixed_text_and_image():
    model = tiny_model()
    ids, vi, signal = mixed_batch(trailing_image_patches=2)
    with torch.no_grad():
        got = model(input_ids=ids, vision_indices=vi, contiguous_signal=signal).logits
        want = _spec_forward(model, ids, vi, signal)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(got[finite], want[finite], atol=1e-5, rtol=1e-5)
    # the bridge matters: zeroing it changes image-conditioned text logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bridge" in name:
                p.zero_()
        plain = model(input_ids=ids, vision_indices=vi, contiguous_signal=signal).logits
    assert not torch.allclose(plain[0, :, 9:13, :TEXT_VOCAB], got[0, :, 9:13, :TEXT_VOCAB], atol=1e-4)  # text after the image


def test_eager_attention_equals_sdpa():
    model = tiny_model()
    ids, vi, signal = mixed_batch()
    with torch.no_grad():
        sdpa = model(input_ids=ids, vision_indices=vi, contiguous_signal=signal).logits
        model.config._attn_implementation = "eager"
        eager = model(input_ids=ids, vision_indices=vi, contiguous_signal=signal).logits
    finite = torch.isfinite(sdpa)
    assert torch.allclose(sdpa[finite], eager[finite], atol=1e-5)


def test_loss_is_the_architecture_loss():
    """loss = [sum_text CE_text + sum_vis (CE_vis0 + CE_vis1)/2] / N_valid with labels shifted inside."""
    model = tiny_model()
    ids, vi, signal = mixed_batch()
    labels = ids.clone()
    labels[:, :, 0] = -100
    labels[:, 1, 5] = -100
    labels[:, vi == 0] = -100  # <boi> and the "\n" after <eoi> are never targets (docs/architecture.md#labels)
    labels[:, :, 1:][:, vi[:, :-1] == IMAGE_LEN - 1] = -100
    out = model(input_ids=ids, vision_indices=vi, contiguous_signal=signal, labels=labels)
    logits = out.logits.detach()
    total, count = 0.0, 0
    for b in range(ids.shape[1]):
        for t in range(ids.shape[2] - 1):
            target = labels[0, b, t + 1]
            if target == -100:
                continue
            count += 1
            if vi[b, t] < IMAGE_LEN:  # vision position: the two codebook heads, 10-way each
                total += sum(F.cross_entropy(logits[c, b, t, TEXT_VOCAB:], labels[c, b, t + 1] - TEXT_VOCAB).item()
                             for c in range(2)) / 2
            else:
                total += F.cross_entropy(logits[0, b, t, :TEXT_VOCAB], target).item()
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)
    out.loss.backward()
    assert model.model.vision_embed_tokens[0].weight.grad.abs().sum() > 0


def test_cached_decoding_equals_full_forward_across_image_boundaries():
    model = tiny_model()
    ids, vi, signal = mixed_batch(trailing_image_patches=3)
    with torch.no_grad():
        full = model(input_ids=ids, vision_indices=vi, contiguous_signal=signal).logits
        split = 4  # prefill text + start of the image, then one position at a time (with its CLIP feature)
        out = model(input_ids=ids[..., :split], vision_indices=vi[:, :split], contiguous_signal=signal[:, :split], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(split, ids.shape[-1]):
            out = model(input_ids=ids[..., t:t + 1], vision_indices=vi[:, t:t + 1], contiguous_signal=signal[:, t:t + 1],
                        past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=2)
    finite = torch.isfinite(full)
    assert torch.equal(finite, torch.isfinite(stepped))
    assert torch.allclose(stepped[finite], full[finite], atol=1e-5)
    assert cache.get_seq_length() == ids.shape[-1]
    assert torch.equal(cache.vision_flag, vi < IMAGE_LEN)


def test_text_only_forward_equals_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config()
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=10000.0, tie_word_embeddings=False)).eval()
    model = tiny_model()
    _, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = llama(ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, attention_mask=mask, position_ids=positions).logits
    assert got.shape == (2, 2, 9, cfg.vocab_size + cfg.vision_vocab_size)
    assert torch.allclose(got[0, 0, 3:, : cfg.vocab_size], want[0, 3:], atol=1e-5)
    assert torch.allclose(got[0, 1, :, : cfg.vocab_size], want[1], atol=1e-5)
    assert torch.equal(got[0], got[1]) and torch.isinf(got[..., cfg.vocab_size:]).all()


def test_inconsistent_inputs_fail_clearly():
    model = tiny_model()
    ids, vi, signal = mixed_batch()
    wrong = vi.clone()
    wrong[0, 3] = IMAGE_LEN  # <boi> position marked as text
    with pytest.raises(ValueError, match="disagree"):
        model(input_ids=ids, vision_indices=wrong)
    with pytest.raises(ValueError, match=r"input_ids must be \[2, B, L\]"):
        model(input_ids=ids[:1], vision_indices=vi)
    with pytest.raises(ValueError, match="dormant"):
        tiny_model(vision_prediction_mode="2d")


def test_shipped_files_import_only_torch_and_transformers():
    from libra_megatron.checkpoint.hf_writer import MODELING_FILES, modeling_source_dir

    allowed = {"torch", "transformers", "math", "dataclasses", "typing", "__future__"}
    for name in MODELING_FILES:
        with open(os.path.join(modeling_source_dir(), name)) as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: a sibling shipped file
                    assert f"{node.module}.py" in MODELING_FILES, (name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (name, roots)
