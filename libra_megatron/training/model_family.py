"""The small interface between the training loop and a model: build it, feed it a micro-batch, reduce its loss.

A Megatron user writes ``model_provider(pre_process, post_process, vp_stage)`` and ``forward_step(data_iterator,
model)``; :class:`ModelFamily` bundles exactly those (plus the config, freezing and FLOPs accounting), so the loop in
``loop.py`` knows nothing about Libra or GPT. ``families.py`` names the built-in families (``--model-family``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from libra_megatron.utils.megatron_compat import batch_p2p_comm_is_safe

LOSS_KEYS = ("lm loss", "text loss", "image loss")


@dataclass
class BatchStats:
    """Token counts of the micro-batches one rank ran in a step; summed over DP they give the step's FLOPs."""

    samples: int = 0
    text_tokens: int = 0
    image_tokens: int = 0
    images: int = 0
    attention_pairs: float = 0.0  # sum over sequences/segments of causal query-key pairs (L*(L+1)/2)

    def add(self, other: "BatchStats") -> None:
        """Accumulate another micro-batch's counts."""
        self.samples += other.samples
        self.text_tokens += other.text_tokens
        self.image_tokens += other.image_tokens
        self.images += other.images
        self.attention_pairs += other.attention_pairs

    def as_tensor(self) -> torch.Tensor:
        """float64 vector [samples, text, image, images, pairs] for an all-reduce."""
        return torch.tensor([self.samples, self.text_tokens, self.image_tokens, self.images, self.attention_pairs],
                            dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "BatchStats":
        """Inverse of :meth:`as_tensor`."""
        v = values.tolist()
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), float(v[4]))


def batch_stats(batch: Dict[str, torch.Tensor], vocab: Any) -> BatchStats:
    """Real token counts of one micro-batch of the batch contract (right padding excluded).

    Packed rows: the positions with ``segment_ids > 0``, attention pairs counted per segment; unpacked rows: up to
    the last non-pad token. Causal attention: ``L (L + 1) / 2`` query-key pairs per sequence of length ``L``.
    """
    from libra_megatron.model.routing import vision_flag

    routing = batch.get("routing")  # built by the family's prepare_batch: reuse its flag
    vision = routing.is_vision if routing is not None else vision_flag(batch["vision_indices"], vocab)
    segments = batch.get("segment_ids")
    if segments is not None:
        valid = segments > 0
        pairs = 0.0
        for row in segments:
            _, counts = torch.unique_consecutive(row[row > 0], return_counts=True)
            pairs += float((counts.double() * (counts.double() + 1) / 2).sum())
    else:
        content = (batch["tokens"][0] != vocab.pad_id) | vision
        positions = torch.arange(content.shape[1]).expand_as(content)
        lengths = torch.where(content, positions + 1, torch.zeros_like(positions)).amax(dim=1)
        valid = positions < lengths.unsqueeze(1)
        pairs = float((lengths.double() * (lengths.double() + 1) / 2).sum())
    image_tokens = int((vision & valid).sum())
    text_tokens = int(valid.sum()) - image_tokens
    images = int(batch["pixels"].shape[0]) if batch.get("pixels") is not None else 0
    return BatchStats(int(batch["tokens"].shape[1]), text_tokens, image_tokens, images, pairs)


@dataclass
class ModelFamily:
    """How the loop builds, feeds and accounts for one kind of model.

    Attributes:
        name: registry key (``--model-family``).
        shape: ``args -> {"num_attention_heads", "num_layers"}`` without building anything (start-up validation).
        build_config: ``args -> TransformerConfig`` (with TP/PP/precision/recompute taken from ``args``).
        provider: ``(config, args, pre_process, post_process, vp_stage) -> MegatronModule``.
        set_trainable: ``(module, stage) -> None``: freezes what the stage does not train.
        run_model: ``(model, batch, clip_features) -> output`` (hidden states, or the per-position loss on the
            last stage).
        reduce_loss: ``(output, batch, vocab, image_loss_weight) -> (loss_sum, num_tokens, {key: [sum, count]})``
            for ``LOSS_KEYS`` (the report unweighted).
        flops_counter: ``(args, config) -> (BatchStats -> float)``, built once per run: model FLOPs of one training
            step on those tokens (forward + backward, frozen weights counted 4N, trainable 6N, frozen CLIP forward
            2N); the per-token constants live on the counter.
        vocab: the ``LibraVocab`` of the batches the model reads.
        needs_vision: whether the first stage needs CLIP features from ``pixels``.
        build_vision: ``(args) -> callable(pixels uint8 [N,3,H,W]) -> clip features``: the frozen CLIP tower,
            built on first-stage ranks only (no grads, not in the optimizer).
        prepare_batch: ``(config, device or None, batch) -> None``: called by the data streams once per host
            micro-batch before it moves to the device (e.g. Libra builds and validates its routing there, shared
            by every model chunk and the loss).
    """

    name: str
    shape: Callable[[argparse.Namespace], Dict[str, int]]
    build_config: Callable[[argparse.Namespace], Any]
    provider: Callable[..., torch.nn.Module]
    set_trainable: Callable[[torch.nn.Module, str], None]
    run_model: Callable[..., torch.Tensor]
    reduce_loss: Callable[..., Tuple[torch.Tensor, torch.Tensor, Dict]]
    flops_counter: Callable[[argparse.Namespace, Any], Callable[[BatchStats], float]]
    vocab: Callable[[argparse.Namespace], Any]
    needs_vision: bool = False
    build_vision: Optional[Callable[[argparse.Namespace], Callable[[torch.Tensor], torch.Tensor]]] = None
    prepare_batch: Optional[Callable[[Any, Optional[torch.device], Dict[str, Any]], None]] = None


def _gradient_accumulation_fusion(args: argparse.Namespace) -> bool:
    """Whether weight gradients accumulate into ``main_grad`` inside the GEMM (``--no-gradient-accumulation-fusion``
    turns it off). On, megatron's own linears need the ``fused_weight_gradient_mlp_cuda`` module: ours is
    registered here, before any layer is built (``libra_megatron/ops/wgrad_accum.py``)."""
    enabled = bool(getattr(args, "gradient_accumulation_fusion", False))
    if enabled:
        from libra_megatron.ops.wgrad_accum import install_megatron_module

        install_megatron_module()
    return enabled


def parallel_config_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """TransformerConfig fields every family takes from the flags: layout, precision, recompute, loss mode."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    on_cpu = getattr(args, "device", "cpu") == "cpu"
    gloo = (args.distributed_backend or ("gloo" if on_cpu else "nccl")) == "gloo"
    vpp = args.virtual_pipeline_model_parallel_size
    kwargs = dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=args.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=torch.float32 if not args.bf16 else torch.bfloat16,
        bf16=args.bf16,
        calculate_per_token_loss=args.calculate_per_token_loss,
        use_cpu_initialization=on_cpu or getattr(args, "meta_device", False),
        perform_initialization=not getattr(args, "meta_device", False),
        gradient_accumulation_fusion=_gradient_accumulation_fusion(args),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # docs/architecture.md#cpu-megatron: not batched at interleaved PP=2 on gloo (megatron_compat)
        batch_p2p_comm=batch_p2p_comm_is_safe(args.pipeline_model_parallel_size, vpp, "gloo" if gloo else "nccl"),
    )
    if args.recompute_granularity == "full":
        kwargs.update(recompute_granularity="full", recompute_method=args.recompute_method,
                      recompute_num_layers=args.recompute_num_layers)
    elif args.recompute_granularity == "selective":
        kwargs.update(recompute_granularity="selective")
    return kwargs


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP and Float16Module wrappers (anything with a ``.module`` that is a megatron wrapper)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(model, (DistributedDataParallel, Float16Module)):
        model = model.module
    return model


def masked_sum_and_count(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[sum of per_position over mask, count]`` as a float tensor of 2 (a Megatron loss report entry)."""
    mask = mask.to(per_position.dtype)
    return torch.stack([(per_position.float() * mask.float()).sum(), mask.float().sum()])
