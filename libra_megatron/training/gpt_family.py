"""A text-only LLaMA-style megatron-core ``GPTModel`` (local spec) behind the :class:`ModelFamily` interface.

It reads plane 0 of the batch contract (``tokens[0]``, ``labels[0]``) and treats every position as text, so the
same data, loop, checkpoints and logging run a dense baseline next to Libra (``--model-family gpt``). Packed
samples (``segment_ids``) are refused: GPTModel's RoPE does not restart positions per segment.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Tuple

import torch

from libra_megatron.training.model_family import BatchStats, ModelFamily, masked_sum_and_count, parallel_config_kwargs
from libra_megatron.vocab import IGNORE_INDEX, LibraVocab

# name -> (layers, hidden, heads, ffn, vocab of the Libra id space it reads)
GPT_PRESETS: Dict[str, Dict[str, Any]] = {
    "gpt-tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176,
                     vocab=LibraVocab(text_vocab_size=256, codebook_size=16, image_resolution=2)),
    "llama2-7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
                      vocab=LibraVocab()),
}


def _preset(args: argparse.Namespace) -> Dict[str, Any]:
    if args.model not in GPT_PRESETS:
        raise ValueError(f"--model-family gpt needs --model, one of {sorted(GPT_PRESETS)}" if args.model is None
                         else f"--model '{args.model}' is not a GPT preset; known: {sorted(GPT_PRESETS)}")
    return GPT_PRESETS[args.model]


def _shape(args: argparse.Namespace) -> Dict[str, int]:
    preset = _preset(args)
    return {"num_attention_heads": preset["num_attention_heads"], "num_layers": preset["num_layers"]}


def _build_config(args: argparse.Namespace) -> Any:
    from megatron.core.transformer import TransformerConfig

    preset = _preset(args)
    return TransformerConfig(
        num_layers=args.num_layers or preset["num_layers"], hidden_size=preset["hidden_size"],
        num_attention_heads=preset["num_attention_heads"], ffn_hidden_size=preset["ffn_hidden_size"],
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, add_bias_linear=False,
        activation_func=torch.nn.functional.silu, **parallel_config_kwargs(args),
    )


def _provider(config: Any, args: argparse.Namespace, pre_process: bool, post_process: bool,
              vp_stage: Any = None) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    vocab = _preset(args)["vocab"]
    return GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=vocab.total_vocab_size,
        max_sequence_length=args.seq_length, pre_process=pre_process, post_process=post_process,
        position_embedding_type="rope", share_embeddings_and_output_weights=False, vp_stage=vp_stage,
    )


def _set_trainable(module: torch.nn.Module, stage: str) -> None:
    for param in module.parameters():
        param.requires_grad_(True)


def _run_model(model: torch.nn.Module, batch: Dict[str, torch.Tensor], clip_features: Any) -> torch.Tensor:
    if batch.get("segment_ids") is not None:
        raise ValueError("the GPT baseline does not support packed samples (segment_ids); use the Libra model")
    labels = batch["labels"][0]
    return model(batch["tokens"][0], batch["position_ids"], None, labels=labels.clamp_min(0))


def _reduce_loss(output: torch.Tensor, batch: Dict[str, torch.Tensor], vocab: Any,
                 image_loss_weight: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    mask = batch["labels"][0] != IGNORE_INDEX
    loss_sum = (output.float() * mask).sum()
    count = mask.sum().to(torch.int)
    total = masked_sum_and_count(output, mask)
    zero = torch.zeros(2, dtype=total.dtype, device=total.device)
    return loss_sum, count, {"lm loss": total, "text loss": total.clone(), "image loss": zero}


def _flops_counter(args: argparse.Namespace, config: Any) -> Callable[[BatchStats], float]:
    """6N per token for the layers and the head (all trainable); 3 x 4d per causal query-key pair per layer."""
    h, layers, ffn = config.hidden_size, config.num_layers, config.ffn_hidden_size
    per_token = 6.0 * (layers * (4 * h * h + 3 * h * ffn) + h * _preset(args)["vocab"].total_vocab_size)
    per_pair = 3.0 * 4.0 * h * layers  # forward QK^T + PV: 4d FLOPs per pair; backward 2x

    def step_flops(stats: BatchStats) -> float:
        return per_token * (stats.text_tokens + stats.image_tokens) + per_pair * stats.attention_pairs

    return step_flops


def gpt_family() -> ModelFamily:
    """The dense GPT baseline family."""
    return ModelFamily(
        name="gpt", shape=_shape, build_config=_build_config, provider=_provider, set_trainable=_set_trainable,
        run_model=_run_model, reduce_loss=_reduce_loss, flops_counter=_flops_counter,
        vocab=lambda args: _preset(args)["vocab"], needs_vision=False,
    )
