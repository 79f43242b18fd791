"""Model chunks, DDP, the Megatron optimizer and the LR schedule, as Megatron-LM's ``get_model`` +
``setup_model_and_optimizer`` build them, minus everything CUDA-bound.

- One chunk per virtual pipeline stage (``pre_process`` only on the first chunk of the first stage, ``post_process``
  only on the last chunk of the last stage).
- Parameters the stage does not train are frozen *before* DDP, so DDP's grad buffers and the optimizer (which only
  takes ``requires_grad`` parameters) cover exactly the trainable ones.
- bf16: :class:`~megatron.core.transformer.module.Float16Module` and fp32 grad buffers / main params.
- AdamW through ``get_megatron_optimizer`` (fused, with device-side grad clipping: ``training/optimizer.py``):
  megatron's standard overrides give weight decay multiplier 0 to every
  1-D parameter (all norm weights) and every ``*.bias`` — the reference's "no decay on norms and biases".
- Cosine (or linear/constant) decay with linear warmup via ``OptimizerParamScheduler``, stepped in samples like
  Megatron-LM so the schedule is independent of the batch layout.
"""
from __future__ import annotations

import argparse
from typing import Any, List, Tuple

import torch

from libra_megatron.ops.wgrad_accum import enable_wgrad_accumulation_fusion
from libra_megatron.training.model_family import ModelFamily
from libra_megatron.training.optimizer import fused_optimizer_kernels


def build_model_chunks(family: ModelFamily, args: argparse.Namespace, config: Any) -> List[torch.nn.Module]:
    """Unwrapped model chunks of this rank (one per virtual stage), frozen for ``args.stage``, on the device."""
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType

    vpp = args.virtual_pipeline_model_parallel_size
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    chunks = []
    for vp_stage in range(vpp or 1):
        pre_process = first and vp_stage == 0
        post_process = last and vp_stage == (vpp or 1) - 1
        chunk = family.provider(config, args, pre_process, post_process, vp_stage if vpp else None)
        chunk.model_type = ModelType.encoder_or_decoder
        if vpp:
            chunk.vp_stage = vp_stage
        family.set_trainable(chunk, args.stage)
        chunks.append(chunk)
    if args.device == "cuda":
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    if getattr(config, "gradient_accumulation_fusion", False):  # Libra's own weights too (ops/wgrad_accum.py)
        enable_wgrad_accumulation_fusion(chunks)
    return chunks


def count_parameters(chunks: List[torch.nn.Module]) -> Tuple[int, int]:
    """(total, trainable) parameters held by this rank."""
    params = [p for chunk in chunks for p in chunk.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def wrap_model_chunks(chunks: List[torch.nn.Module], args: argparse.Namespace, config: Any) -> List[torch.nn.Module]:
    """Float16Module (bf16) and megatron DDP around each chunk; sets the schedule hooks on ``config``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    if args.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        # Megatron-LM's default: the schedules dispatch the param all-gathers (config.param_sync_func below);
        # without it the forward pre-hooks dispatch them too and a bucket is started twice.
        align_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=None if not args.overlap_grad_reduce else 40_000_000,
    )
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in wrapped]
        grad_sync = [chunk.start_grad_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(wrapped) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(wrapped) == 1 else grad_sync
    if args.overlap_param_gather:
        param_sync = [chunk.start_param_sync for chunk in wrapped]
        config.param_sync_func = param_sync[0] if len(wrapped) == 1 else param_sync
    return wrapped


def build_optimizer(model: List[torch.nn.Module], args: argparse.Namespace) -> Any:
    """AdamW (decoupled weight decay) over the trainable parameters, with grad clipping; DistributedOptimizer
    when ``--use-distributed-optimizer``. Sets ``config.grad_scale_func``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.utils import get_model_config

    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        decoupled_weight_decay=True, clip_grad=args.clip_grad, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer, overlap_param_gather=args.overlap_param_gather,
    )
    with fused_optimizer_kernels():  # fused AdamW + device-side grad norm/clip (libra_megatron/training/optimizer.py)
        optimizer = get_megatron_optimizer(optimizer_config, model)
    get_model_config(model[0]).grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer: Any, args: argparse.Namespace) -> Any:
    """Megatron's OptimizerParamScheduler, counted in samples (``increment = global batch`` per step)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
