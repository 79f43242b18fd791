"""The Libra model (``libra_megatron.model.LibraModel``) behind the loop's :class:`ModelFamily` interface.

Feeding: every stage gets ``vision_indices``/``position_ids``/``segment_ids`` (routing), the first stage also
``tokens`` and the CLIP features of the micro-batch's images, the last stage ``labels``; the last stage returns the
per-position loss, reduced by ``libra_loss_reduction`` into total / text / image sums and token counts.

FLOPs (:class:`LibraStepFlops`), per training step, for the tokens actually present:

* a GEMM with N weights costs 2N per token forward; backward adds 2N for the input gradient and 2N more for the
  weight gradient only when the weight trains: frozen 4N, trainable 6N (``pretrain`` freezes the LLaMA weights);
* text tokens go through the text weights, image tokens (``<boi>``, patches, ``<eoi>``) through the low-rank
  expert (rank out/4), every token through its modality's two rank-r bridge maps (trainable);
* attention scores and values once per causal query-key pair (4·h forward, 3x for forward + backward), though the
  engine may compute two attention calls for the bridge;
* image positions: the hybrid input projection ``(h + F) -> h``; outputs: the text head on text positions, the C
  codebook heads on image positions;
* the frozen CLIP tower: forward only (2N), blocks up to the deepest selected layer.
Activation recompute is not counted (model FLOPs, as Megatron-LM's MFU).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from libra_megatron.training.model_family import BatchStats, ModelFamily, parallel_config_kwargs


def _preset_fields(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's architecture: preset, flags or starting checkpoint (``training/architecture.py``)."""
    from libra_megatron.training.architecture import resolve_architecture

    return resolve_architecture(args)


def _shape(args: argparse.Namespace) -> Dict[str, Any]:
    preset = _preset_fields(args)
    return {"num_attention_heads": preset["num_attention_heads"], "num_layers": preset["num_layers"],
            "architecture": preset}


def _build_config(args: argparse.Namespace) -> Any:
    from libra_megatron.config import libra_config

    return libra_config(None, **{**_preset_fields(args), **parallel_config_kwargs(args)},
                        layer_cuda_graphs=bool(getattr(args, "layer_cuda_graphs", False)))


def _vocab(args: argparse.Namespace) -> Any:
    from libra_megatron.vocab import LibraVocab

    preset = _preset_fields(args)
    return LibraVocab(text_vocab_size=preset["text_vocab_size"], codebook_size=preset["codebook_size"],
                      num_codebooks=preset["num_codebooks"], image_resolution=preset["image_resolution"])


def _provider(config: Any, args: argparse.Namespace, pre_process: bool, post_process: bool,
              vp_stage: Any = None) -> torch.nn.Module:
    from libra_megatron.model.libra_model import LibraModel

    return LibraModel(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


def _set_trainable(module: torch.nn.Module, stage: str) -> None:
    module.set_training_stage(stage)


def _prepare_batch(config: Any, device: Any, batch: Dict[str, Any]) -> None:
    """Data path, once per micro-batch on the host copies: build and validate the one ``ModalityRouting`` every
    model chunk, pipeline stage and the loss of this rank share (``batch["routing"]``)."""
    from libra_megatron.model.micro_batch import build_micro_batch_routing
    from libra_megatron.utils.transfer import to_device_async

    batch["position_ids"] = to_device_async(batch["position_ids"], device)
    batch["routing"] = build_micro_batch_routing(
        config, batch["vision_indices"], batch["position_ids"], batch.get("segment_ids"), tokens=batch["tokens"],
        labels=batch["labels"], device=device)


def _run_model(model: torch.nn.Module, batch: Dict[str, torch.Tensor], clip_features: Any) -> torch.Tensor:
    return model(batch["tokens"], batch["vision_indices"], batch["position_ids"], labels=batch["labels"],
                 clip_features=clip_features, segment_ids=batch.get("segment_ids"), routing=batch.get("routing"))


def _reduce_loss(output: torch.Tensor, batch: Dict[str, torch.Tensor], vocab: Any,
                 image_loss_weight: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """``libra_loss_reduction`` (docs/architecture.md#loss) with the micro-batch's routing; ``image_loss_weight``
    weighs image positions in the optimised sum (an ablation knob, docs/architecture.md#loss-weighting; the report
    keeps the unweighted losses)."""
    from libra_megatron.model.output import libra_loss_reduction

    return libra_loss_reduction(output, batch["labels"], batch["vision_indices"], vocab,
                                routing=batch.get("routing"), image_loss_weight=image_loss_weight)


@dataclass(frozen=True)
class LibraStepFlops:
    """Model FLOPs of one Libra training step (forward + backward) on the tokens of a :class:`BatchStats`.

    The per-token and per-pair constants are computed once per run from the model config, the stage (the LLaMA
    weights train, 6N, only in ``instruct``; frozen they cost 4N) and the frozen CLIP tower's geometry.
    """

    text_per_token: float
    image_per_token: float
    per_pair: float
    clip: Optional[Dict[str, int]] = None

    @classmethod
    def for_run(cls, config: Any, stage: str, clip: Optional[Dict[str, int]]) -> "LibraStepFlops":
        """The constants of a run (``clip``: ``vision.clip_geometry`` of its image tokenizer, or None)."""
        h, f, layers = config.hidden_size, config.ffn_hidden_size, config.num_layers
        ra, rf, rb = h // config.vision_down_ratio, f // config.vision_down_ratio, config.bridge_rank
        text_mult = 6.0 if stage == "instruct" else 4.0  # the LLaMA weights train only in instruct
        text_layer = 4 * h * h + 3 * h * f
        vision_layer = 4 * (h * ra + ra * h) + 2 * (h * rf + rf * f) + (f * ra + ra * h)
        bridge_layer = 2 * (h * rb + rb * h)  # the K and V bridge of the token's own modality
        text = layers * (text_mult * text_layer + 6.0 * bridge_layer) + text_mult * h * config.text_vocab_size
        image = (layers * (6.0 * vision_layer + 6.0 * bridge_layer)
                 + 6.0 * (h + config.clip_feature_size) * h  # hybrid input projection
                 + 6.0 * h * config.num_codebooks * (config.codebook_size + 2))
        return cls(float(text), float(image), layers * 3.0 * 4.0 * h, clip)

    def __call__(self, stats: BatchStats) -> float:
        from libra_megatron.training.vision import clip_forward_flops

        flops = (self.text_per_token * stats.text_tokens + self.image_per_token * stats.image_tokens
                 + self.per_pair * stats.attention_pairs)
        if self.clip is not None:
            flops += clip_forward_flops(self.clip, stats.images)
        return flops


def _flops_counter(args: argparse.Namespace, config: Any) -> LibraStepFlops:
    from libra_megatron.training.vision import clip_geometry

    return LibraStepFlops.for_run(config, args.stage, clip_geometry(args.image_tokenizer) if args.image_tokenizer
                                  else None)


def _build_vision(args: argparse.Namespace) -> Any:
    from libra_megatron.training.vision import FrozenClipFeatures

    return FrozenClipFeatures(args)


def libra_family() -> ModelFamily:
    """The Libra family (the default ``--model-family``)."""
    return ModelFamily(
        name="libra", shape=_shape, build_config=_build_config, provider=_provider, set_trainable=_set_trainable,
        run_model=_run_model, reduce_loss=_reduce_loss, flops_counter=_flops_counter, vocab=_vocab, needs_vision=True,
        build_vision=_build_vision, prepare_batch=_prepare_batch,
    )
