"""Text-only input through the Libra engine gives the outputs of Hugging Face `LlamaForCausalLM` with the same
weights: the frozen text path is exactly LLaMA (docs/architecture.md#decoder-layer)."""
from __future__ import annotations

import torch

from tests.distributed import run_on_ranks
from tests.model.helpers import hf_weights, make_batch, max_relative_error, tiny_sizes


def _engine_text_logits(layouts) -> list:
    from tests.model.helpers import build_model, load_hf, model_inputs, tiny_config

    config = tiny_config()
    model = build_model(config)
    load_hf(model, hf_weights(tiny_sizes()), config)
    out = []
    with torch.no_grad():
        for layout in layouts:
            inputs = model_inputs(make_batch(layout))
            inputs.pop("labels")
            out.append(model(**inputs)[0, :, :, : config.text_vocab_size])
    return out


def _llama(weights) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = tiny_sizes()
    config = LlamaConfig(vocab_size=s["text_vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                         rms_norm_eps=s["eps"], rope_theta=s["rope_base"], max_position_embeddings=2048,
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    missing = [k for k in state if k not in weights]
    assert not missing, f"LLaMA keys without a Libra counterpart: {missing}"
    model.load_state_dict({k: weights[k] for k in state})
    return model


def test_text_only_equals_hf_llama() -> None:
    (engine,) = run_on_ranks(_engine_text_logits, world_size=1, args=(["text_only"],))
    batch = make_batch("text_only")
    model = _llama(hf_weights(tiny_sizes()))
    with torch.no_grad():
        expected = model(input_ids=batch["tokens"][0], position_ids=batch["position_ids"]).logits
    assert max_relative_error(engine[0], expected) <= 1e-6
