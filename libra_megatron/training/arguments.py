"""Megatron-style command-line flags for ``pretrain_libra.py``, an optional YAML file, and start-up validation.

Flag names follow Megatron-LM (``--tensor-model-parallel-size``, ``--micro-batch-size``, ``--lr-warmup-fraction``,
``--save-interval``, ...) so existing launch scripts read naturally. A YAML file given with ``--config`` supplies
defaults (keys are flag names with ``_`` or ``-``); flags on the command line win over it.

:func:`validate_args` runs in every process *before* any process group exists, so a bad configuration
(TP not dividing the heads, a global batch that does not split, a missing data file, ...) stops every rank at
once with the same clear message instead of leaving some ranks waiting in a collective.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional, Sequence

import yaml

from libra_megatron.evaluation.engine_captioning import add_captioning_args, validate_captioning_args
from libra_megatron.training.architecture import FIELD_FLAGS, add_architecture_args
from libra_megatron.training.run_config import RunConfig


class ConfigError(ValueError):
    """A configuration problem found before training starts; the message names the flag or file."""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="Libra preset (libra-7b, tiny) or a GPT preset; Libra default: the architecture of the "
                            "checkpoint the run starts from (--load / --pretrained-checkpoint), else tiny")
    group.add_argument("--model-family", default="libra", choices=["libra", "gpt"],
                       help="libra = the Libra model; gpt = a text-only LLaMA-style megatron-core GPTModel baseline")
    group.add_argument("--stage", default="pretrain", choices=["pretrain", "instruct"],
                       help="pretrain: only vision parameters train; instruct: every LLM parameter trains")
    group.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    group.add_argument("--seq-length", type=int, default=700, help="tokens per sample (700 pretrain, 2048 instruct)")
    group.add_argument("--bf16", action="store_true", help="bf16 parameters (Float16Module) with fp32 main params")
    group.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    group.add_argument("--recompute-method", default="uniform", choices=["uniform", "block"])
    group.add_argument("--recompute-num-layers", type=int, default=1)
    group.add_argument("--layer-cuda-graphs", action="store_true",
                       help="Libra: replay each stage's layers as CUDA graphs for micro-batches of a fixed layout "
                            "(CUDA, TP=1, PP=1, no recompute, not with --overlap-param-gather; model/cuda_graphs.py)")
    group.add_argument("--image-tokenizer", default=None,
                       help="folder of the frozen image tokenizer (CLIP runs on the first pipeline stage), "
                            "or 'tiny:SEED' for the random tiny tokenizer of tests and the CPU demo")
    add_architecture_args(group)


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                       help="model chunks per pipeline rank (interleaved 1F1B)")
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--use-distributed-optimizer", action="store_true")
    group.add_argument("--overlap-grad-reduce", action="store_true")
    group.add_argument("--overlap-param-gather", action="store_true")
    group.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                       help="default: nccl with CUDA, gloo on CPU")
    group.add_argument("--distributed-timeout-minutes", type=int, default=30)
    group.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, default=1)
    group.add_argument("--global-batch-size", type=int, default=None, help="default: micro-batch size x DP")
    group.add_argument("--train-iters", type=int, default=None)
    group.add_argument("--lr", type=float, default=1e-4)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    group.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    group.add_argument("--lr-warmup-fraction", type=float, default=None, help="warmup as a fraction of decay iters")
    group.add_argument("--lr-warmup-iters", type=int, default=0)
    group.add_argument("--weight-decay", type=float, default=0.01, help="not applied to norms and biases")
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.99)
    group.add_argument("--adam-eps", type=float, default=1e-8)
    group.add_argument("--clip-grad", type=float, default=1.0)
    group.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false",
                       help="compute weight gradients separately and add them to main_grad (default: the GEMM "
                            "accumulates into main_grad in place, libra_megatron/ops/wgrad_accum.py)")
    group.add_argument("--calculate-per-token-loss", action="store_true",
                       help="normalise by the tokens of the whole global batch (default: mean of per-micro-batch "
                            "token means, as the Libra reference / HF Trainer does)")
    group.add_argument("--image-loss-weight", type=float, default=1.0,
                       help="weight of image-position losses in the optimised sum (1.0 = the reference; an "
                            "ablation knob against the ~577:20 image:caption token imbalance, docs/architecture.md#loss-weighting)")
    group.add_argument("--on-nan", default="skip", choices=["skip", "stop"],
                       help="what a non-finite loss does after it is reported: skip the update or stop the run")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--exit-interval", type=int, default=None,
                       help="stop (saving a checkpoint with --save) once the iteration is a multiple of this")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="on SIGTERM: finish the step, save a checkpoint and exit")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="dataset prefixes, optionally weighted: 'w1 prefix1 w2 prefix2'")
    group.add_argument("--mock-data", action="store_true", help="deterministic synthetic samples (no files)")
    group.add_argument("--packing", action="store_true", help="pack several samples per row (block-diagonal attention)")
    group.add_argument("--sequence-padding", default="dynamic", choices=["dynamic", "fixed"],
                       help="dynamic: cut each micro-batch to its longest sample rounded up to --pad-to-multiple-of "
                            "(PP > 1: to the step's longest); fixed: every micro-batch is --seq-length long")
    group.add_argument("--pad-to-multiple-of", type=int, default=16,
                       help="length granularity of dynamic padding (x TP under --sequence-parallel)")
    group.add_argument("--data-seed", type=int, default=None, help="seed of the sample order (default: --seed)")
    group.add_argument("--data-cache-path", default=None,
                       help="shared folder for the sample-order cache (rank 0 builds it, every rank mmaps it)")
    group.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    group.add_argument("--valid-data-path", nargs="*", default=None,
                       help="validation dataset prefixes (same format and weights syntax as --data-path, e.g. "
                            "COCO-Karpathy val through tools/preprocess_images.py); --mock-data has its own")


def _add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument("--eval-interval", type=int, default=None,
                       help="evaluate the validation loss every N iterations (and at the end of training)")
    group.add_argument("--eval-iters", type=int, default=0,
                       help="global batches per evaluation; > 0 without --eval-interval evaluates at the end only")
    group.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                       help="also write the validation perplexities to TensorBoard")


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save", default=None, help="checkpoint folder")
    group.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at exit)")
    group.add_argument("--keep-last-checkpoints", type=int, default=None,
                       help="keep only the newest K checkpoints in --save (default: keep all)")
    group.add_argument("--load", default=None, help="resume from the latest checkpoint here (if any)")
    group.add_argument("--ckpt-step", type=int, default=None, help="with --load: this iteration instead of the latest")
    group.add_argument("--pretrained-checkpoint", default=None,
                       help="start from these model weights (fresh optimizer, iteration 0) when --load has none")
    group.add_argument("--finetune", action="store_true", help="with --load: model weights only, iteration 0")
    group.add_argument("--no-load-optim", action="store_true")
    group.add_argument("--no-load-rng", action="store_true")
    group.add_argument("--no-save-optim", action="store_true")
    group.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                       help="save the distributed-optimizer state in model space (gathered on DP rank 0), so it "
                            "reloads under a different TP/PP; the default format reshards only over DP")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", type=int, default=1)
    group.add_argument("--tensorboard-dir", default=None)
    group.add_argument("--metrics-file", default=None, help="JSON line per iteration (last rank)")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="per-GPU dense bf16 peak for MFU (default: known for A100/H100/H200)")
    group.add_argument("--timing-log-level", type=int, default=0, choices=[0, 1, 2],
                       help="megatron timers: 0 = iteration time only; 1 = forward-backward, batch-generator, "
                            "optimizer, all-grads-sync, params-all-gather (each syncs the device); 2 = also "
                            "forward/backward compute and pipeline send/recv")
    group.add_argument("--profile", action="store_true",
                       help="torch profiler trace of iterations --profile-step-start+1 .. --profile-step-end")
    group.add_argument("--profile-step-start", type=int, default=10)
    group.add_argument("--profile-step-end", type=int, default=12)
    group.add_argument("--profile-ranks", type=int, nargs="+", default=None, help="global ranks that profile "
                                                                                  "(default: 0)")
    group.add_argument("--profile-dir", default=None,
                       help="where the .pt.trace.json.gz goes (default: --tensorboard-dir)")


def build_parser() -> argparse.ArgumentParser:
    """The full flag set of ``pretrain_libra.py``."""
    parser = argparse.ArgumentParser(
        prog="pretrain_libra.py", description="Train Libra on megatron-core (TP/PP/DP, distributed optimizer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of flag defaults (command line wins)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build on the meta device, print layout, params per rank and memory per GPU, exit")
    parser.add_argument("--dry-run-world-size", type=int, default=None,
                        help="GPUs to plan for in --dry-run (default: WORLD_SIZE)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="--dry-run: memory of one GPU")
    _add_model_args(parser)
    _add_parallel_args(parser)
    _add_training_args(parser)
    _add_data_args(parser)
    _add_evaluation_args(parser)
    add_captioning_args(parser)  # --eval-captioning* (libra_megatron/evaluation/engine_captioning.py)
    _add_checkpoint_args(parser)
    _add_logging_args(parser)
    return parser


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    with open(path) as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(loaded).__name__}")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in loaded.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest == "config":
            raise ConfigError(f"{path}: unknown key '{key}' (not a pretrain_libra.py flag)")
        defaults[dest] = value
    return defaults


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags (with the YAML file of ``--config`` as defaults). Does not validate: see :func:`validate_args`."""
    parser = build_parser()
    preliminary, _ = parser.parse_known_args(argv)
    if preliminary.config:
        parser.set_defaults(**_yaml_defaults(parser, preliminary.config))
    return parser.parse_args(argv)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _split_data_path(data_path: List[str], flag: str = "--data-path") -> List[tuple]:
    """'w1 p1 w2 p2' -> [(w1, p1), ...]; a list of plain prefixes gets weight 1 each."""
    def is_number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    if len(data_path) >= 2 and is_number(data_path[0]):
        _check(len(data_path) % 2 == 0, f"{flag}: weights and prefixes must alternate, got {data_path}")
        pairs = [(float(data_path[i]), data_path[i + 1]) for i in range(0, len(data_path), 2)]
        _check(all(w > 0 for w, _ in pairs), f"{flag}: weights must be positive, got {data_path}")
        return pairs
    return [(1.0, prefix) for prefix in data_path]


def _check_files(blend: List[tuple], flag: str, dataset_files: Any) -> None:
    for _, prefix in blend:
        for path in dataset_files(prefix):
            _check(os.path.isfile(path), f"{flag}: file not found: {path} (from prefix '{prefix}')")


def _validate_data(args: argparse.Namespace, dataset_files: Any) -> None:
    args.valid_blend = None
    if args.valid_data_path:
        _check(not args.mock_data, "--valid-data-path cannot be combined with --mock-data (which validates on its "
                                   "own synthetic stream)")
        args.valid_blend = _split_data_path(args.valid_data_path, "--valid-data-path")
    if args.mock_data:
        return
    _check(bool(args.data_path), "--data-path is required (dataset prefixes written by tools/preprocess_images.py), "
                                 "or pass --mock-data for synthetic samples")
    args.data_blend = _split_data_path(args.data_path)
    if args.dry_run:  # planning on a machine without the corpus
        return
    _check_files(args.data_blend, "--data-path", dataset_files)
    if args.valid_blend:
        _check_files(args.valid_blend, "--valid-data-path", dataset_files)


def _validate_evaluation(args: argparse.Namespace) -> None:
    """--eval-interval / --eval-iters need each other's sense and a validation source (run after the data)."""
    _check(args.eval_iters >= 0, "--eval-iters must be >= 0")
    if args.eval_interval is not None:
        _check(args.eval_interval > 0, "--eval-interval must be > 0")
        _check(args.eval_iters > 0, f"--eval-interval {args.eval_interval} needs --eval-iters > 0 (global batches "
                                    "per evaluation)")
    if args.eval_iters > 0:
        _check(args.mock_data or bool(args.valid_blend),
               f"--eval-iters {args.eval_iters} needs a validation set: --valid-data-path (prefixes written by "
               "tools/preprocess_images.py, e.g. from COCO-Karpathy val), or --mock-data")


def _model_name(args: argparse.Namespace) -> str:
    return f"model '{args.model}'" if args.model else "the model"


def _validate_parallel(args: argparse.Namespace, world_size: int, model_shape: Dict[str, int]) -> None:
    tp, pp, vpp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
    _check(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    _check(world_size % (tp * pp) == 0,
           f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} = {tp * pp}")
    args.data_parallel_size = world_size // (tp * pp)
    heads, layers = model_shape["num_attention_heads"], model_shape["num_layers"]
    _check(heads % tp == 0, f"--tensor-model-parallel-size {tp} does not divide num_attention_heads {heads} "
                            f"of {_model_name(args)}")
    if vpp is not None:
        _check(pp > 1, "--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1")
        _check(vpp >= 2, "--virtual-pipeline-model-parallel-size must be >= 2 (or unset)")
    chunks = pp * (vpp or 1)
    _check(layers % chunks == 0, f"num_layers {layers} of {_model_name(args)} is not divisible by PP x VPP = {chunks}")
    if args.sequence_parallel:
        _check(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1")
        _check(args.seq_length % tp == 0, f"--seq-length {args.seq_length} must be divisible by TP {tp} under "
                                          "--sequence-parallel")
    if args.overlap_param_gather:
        _check(args.use_distributed_optimizer, "--overlap-param-gather needs --use-distributed-optimizer")
    if getattr(args, "layer_cuda_graphs", False):  # where the captured graphs are correct (model/cuda_graphs.py)
        _check(tp == 1 and pp == 1, "--layer-cuda-graphs needs --tensor- and --pipeline-model-parallel-size 1")
        _check(args.recompute_granularity is None, "--layer-cuda-graphs does not combine with --recompute-granularity")
        _check(not args.overlap_param_gather, "--layer-cuda-graphs does not combine with --overlap-param-gather "
                                              "(its module hooks cannot be captured)")
        # the fused wgrad accumulation writes main_grad as a side effect: capture warm-ups would add into it, and a
        # replay cannot set grad_added_to_main_grad, so DDP would add the placeholder grads as well
        _check(not args.gradient_accumulation_fusion, "--layer-cuda-graphs needs --no-gradient-accumulation-fusion "
                                                      "(the fused accumulation into main_grad cannot be captured)")
        # one graph set per layout: dynamic padding gives a new sequence length (a new capture) every few steps
        _check(args.sequence_padding == "fixed", "--layer-cuda-graphs needs --sequence-padding fixed (a graph is "
                                                 "captured per sequence length)")


def _validate_batch(args: argparse.Namespace) -> None:
    dp, mbs = args.data_parallel_size, args.micro_batch_size
    _check(mbs >= 1, "--micro-batch-size must be >= 1")
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    gbs = args.global_batch_size
    _check(gbs % (mbs * dp) == 0, f"--global-batch-size {gbs} is not divisible by --micro-batch-size x DP = "
                                  f"{mbs} x {dp} = {mbs * dp}")
    args.num_microbatches = gbs // (mbs * dp)
    pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
    if vpp is not None:
        _check(args.num_microbatches >= pp and args.num_microbatches % pp == 0,
               f"the interleaved schedule needs a multiple of PP={pp} micro-batches per step, got "
               f"{args.num_microbatches} (= GBS / (MBS x DP))")


def _validate_schedule(args: argparse.Namespace) -> None:
    _check(args.train_iters is not None and args.train_iters >= 0, "--train-iters is required (>= 0)")
    decay = args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters
    args.lr_decay_iters = max(decay, 1)
    if args.lr_warmup_fraction is not None:
        _check(0.0 <= args.lr_warmup_fraction < 1.0, "--lr-warmup-fraction must be in [0, 1)")
        args.lr_warmup_iters = int(round(args.lr_warmup_fraction * args.lr_decay_iters))
    _check(0 <= args.lr_warmup_iters, "--lr-warmup-iters must be >= 0")
    if args.lr_warmup_iters >= args.lr_decay_iters:
        args.lr_warmup_iters = args.lr_decay_iters - 1
    _check(0.0 <= args.min_lr <= args.lr, f"--min-lr {args.min_lr} must lie in [0, --lr {args.lr}]")
    _check(args.clip_grad >= 0.0, "--clip-grad must be >= 0")


def _validate_checkpointing(args: argparse.Namespace) -> None:
    if args.save_interval is not None:
        _check(args.save_interval > 0, "--save-interval must be > 0")
        _check(args.save is not None, "--save-interval needs --save")
    if args.keep_last_checkpoints is not None:
        _check(args.keep_last_checkpoints >= 1, "--keep-last-checkpoints must be >= 1")
    if args.pretrained_checkpoint is not None and not args.dry_run:
        _check(os.path.isdir(args.pretrained_checkpoint),
               f"--pretrained-checkpoint: folder not found: {args.pretrained_checkpoint}")
    _check(args.log_interval >= 1, "--log-interval must be >= 1")


def _validate_observability(args: argparse.Namespace) -> None:
    _check(args.pad_to_multiple_of >= 1, "--pad-to-multiple-of must be >= 1")
    if args.profile:
        _check(0 <= args.profile_step_start < args.profile_step_end,
               f"--profile-step-start {args.profile_step_start} must be >= 0 and below --profile-step-end "
               f"{args.profile_step_end}")
        _check(bool(args.profile_dir or args.tensorboard_dir), "--profile needs --profile-dir or --tensorboard-dir "
                                                               "(where the trace is written)")


def _validate_device(args: argparse.Namespace) -> None:
    """``--device`` defaults to cuda when available, else cpu (a dry run plans on any machine)."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(args.device != "cuda" or args.dry_run or torch.cuda.is_available(),
           "--device cuda was requested but CUDA is not available")


def validate_args(args: argparse.Namespace, world_size: int, model_shape: Dict[str, int],
                  dataset_files: Any) -> RunConfig:
    """Check the configuration, fill the derived fields (``data_parallel_size``, ``num_microbatches``, the device,
    ...) and return it frozen: a :class:`~libra_megatron.training.run_config.RunConfig` that nothing can change
    (``args`` itself is left as parsed).

    ``model_shape`` holds ``num_attention_heads`` and ``num_layers`` of the chosen model; ``dataset_files(prefix)``
    lists the files a dataset prefix needs. Raises :class:`ConfigError` with a message naming the flag or file.
    """
    args = argparse.Namespace(**vars(args))
    if args.num_layers is not None:
        model_shape = dict(model_shape, num_layers=args.num_layers)
    for field, value in (model_shape.get("architecture") or {}).items():  # the resolved model, stated as flags
        setattr(args, FIELD_FLAGS[field], value)
    _check(args.seq_length >= 2, "--seq-length must be >= 2")
    _validate_parallel(args, world_size, model_shape)
    _validate_batch(args)
    _validate_schedule(args)
    _validate_checkpointing(args)
    _validate_observability(args)
    _validate_data(args, dataset_files)
    _validate_evaluation(args)
    captioning_error = validate_captioning_args(args)
    _check(captioning_error is None, captioning_error or "")
    if args.model_family == "libra" and not args.dry_run:
        _check(args.image_tokenizer is not None, "--image-tokenizer is required for the Libra model (the frozen "
                                                 "CLIP tower makes the continuous features), e.g. 'tiny:0' on CPU")
    _validate_device(args)
    args.world_size = world_size
    return RunConfig.freeze(args)
