#!/usr/bin/env python
"""Convert Libra checkpoints between Hugging Face and the libra-megatron engine (megatron-core dist checkpoints).

    # start Libra pretraining from LLaMA-2 (vision parameters initialised as docs/architecture.md#initialisation, pad row := eos row)
    python tools/convert_checkpoint.py hf-llama-to-engine --source Llama-2-7b-chat-hf --output ckpt/libra-init \\
        --target-tp 4 --target-pp 2 --bf16          # vision fields: --model (default libra-7b) or the flags
    # export a trained checkpoint (any TP/PP it was saved at) to the HF Libra format
    python tools/convert_checkpoint.py engine-to-hf --source runs/pretrain --output libra-base-hf \\
        --tokenizer-dir Llama-2-7b-chat-hf --vision-tokenizer-dir vision-tokenizer
    # import a released Libra checkpoint (libra-11b-base / -chat) to continue training or fine-tune
    python tools/convert_checkpoint.py hf-to-engine --source libra-11b-base --output ckpt/libra-base \\
        --target-tp 2 --target-pp 4 --bf16          # any size: the architecture comes from config.json

The architecture (hidden, layers, heads, ffn, vocab, vision_down_ratio, bridge rank, signal size, codebooks, ...)
is read from the source's ``config.json``; ``--model`` and the architecture flags are optional checks, and a
mismatch is refused naming every differing field. Engine checkpoints are written exactly as the trainer writes them
(``<output>/iter_0000000`` + marker, with the architecture in ``run_config.json``); start from one with
``--pretrained-checkpoint <output>`` (or ``--load <output>``, iteration 0, fresh optimizer) and ``--bf16`` as
converted: the trainer reads the architecture back, so ``--model`` is not needed. The target layout is built for real (one process per TP x PP rank, each holding only
its shard); dist checkpoints reshard, so the trainer may also load them at another layout. Every key and shape is
checked before anything is written; outputs appear atomically.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from libra_megatron.training.architecture import add_architecture_args  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    for name, help_text in (("hf-llama-to-engine", "HF LLaMA-2 -> engine (new Libra pretraining)"),
                            ("hf-to-engine", "HF Libra (released or exported) -> engine")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--source", required=True, help="HF folder (safetensors shards, or .bin loaded weights-only)")
        p.add_argument("--output", required=True, help="engine checkpoint root (trainer --pretrained-checkpoint)")
        p.add_argument("--model", default=None,
                       help="a Libra preset to check the source against (hf-to-engine: the architecture comes from "
                            "config.json; hf-llama-to-engine: the vision fields come from it, default libra-7b)")
        p.add_argument("--num-layers", type=int, default=None, help="architecture flag (as the trainer's)")
        add_architecture_args(p.add_argument_group("architecture (as the trainer's flags; must agree with the "
                                                   "source's config.json)"))
        p.add_argument("--target-tp", type=int, default=1, help="tensor-parallel size to write at")
        p.add_argument("--target-pp", type=int, default=1, help="pipeline-parallel size to write at")
        p.add_argument("--target-vpp", type=int, default=None, help="virtual pipeline chunks per stage")
        p.add_argument("--bf16", action="store_true", help="bf16 parameters (as the trainer's --bf16)")
        p.add_argument("--overwrite", action="store_true")
        if name == "hf-llama-to-engine":
            p.add_argument("--seed", type=int, default=1234, help="seed of the new vision parameters (per key)")
            p.add_argument("--no-copy-eos-to-pad", action="store_true",
                           help="keep embed_tokens[pad]; by default it becomes embed_tokens[eos] (docs/architecture.md#initialisation)")
        else:
            p.add_argument("--copy-eos-to-pad", action="store_true",
                           help="set embed_tokens[pad] := embed_tokens[eos] (the reference does it at each stage start)")
    p = sub.add_parser("engine-to-hf", help="engine -> HF Libra (config + auto_map, modeling code, bf16 shards)")
    p.add_argument("--source", required=True, help="trainer --save root (latest) or an iter_* folder")
    p.add_argument("--ckpt-step", type=int, default=None, help="export this iteration instead of the latest")
    p.add_argument("--output", required=True, help="HF folder to create")
    p.add_argument("--tokenizer-dir", default=None, help="folder with tokenizer.model / tokenizer.json / ...")
    p.add_argument("--vision-tokenizer-dir", default=None, help="folder with the vision tokenizer files")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the shards (released: bf16)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GB (10^9 bytes) per shard")
    p.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ hf -> engine
def _init_megatron(rank: int, world: int, store: str, tp: int, pp: int, vpp, seed: int = 1234) -> None:
    import torch.distributed as dist

    if not torch.cuda.is_available():
        from libra_megatron.utils.cpu import enable_cpu_megatron

        enable_cpu_megatron()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)
    model_parallel_cuda_manual_seed(seed)


def _shutdown_megatron() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _convert_rank(rank: int, world: int, store: str, options: dict, recipe) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    from libra_megatron.checkpoint.engine_checkpoint import convert_on_this_rank, converter_args

    _init_megatron(rank, world, store, options["tp"], options["pp"], options["vpp"])
    try:
        args = converter_args(None, None, options["tp"], options["pp"], options["vpp"], options["bf16"],
                              architecture=options["architecture"])
        convert_on_this_rank(options["output"], args, recipe.open, show_progress=rank == 0)
    finally:
        _shutdown_megatron()


def validate_hf_to_engine(args: argparse.Namespace):
    """Open and check the source against the engine model before any process starts writing; returns the recipe."""
    from libra_megatron.checkpoint.engine_checkpoint import (
        architecture_from_hf,
        architecture_from_llama,
        check_hf_matches_engine,
        converter_args,
        engine_config,
        hf_config_from_engine,
    )
    from libra_megatron.checkpoint.hf_libra import config_fields
    from libra_megatron.checkpoint.hf_llama import read_llama_config
    from libra_megatron.checkpoint.hf_sources import SourceRecipe
    from libra_megatron.checkpoint.safe_io import CheckpointError
    from libra_megatron.config import PRESETS
    from libra_megatron.training.architecture import ArchitectureError, check_against, requested_architecture

    try:
        asked = requested_architecture(args)
    except ArchitectureError as error:
        raise CheckpointError(str(error)) from error
    config_json = os.path.join(args.source, "config.json")
    if args.direction == "hf-to-engine":
        recipe = SourceRecipe("hf", os.path.abspath(args.source), {}, copy_eos_to_pad=args.copy_eos_to_pad)
        source = recipe.open()  # validates every key and shape of the released layout
        architecture = architecture_from_hf(source.config)
    else:
        base = PRESETS[args.model or "libra-7b"]
        libra_fields = {field: asked[field][0] if field in asked else base[field] for field in base}
        architecture = architecture_from_llama(read_llama_config(args.source), libra_fields)
    try:
        check_against(asked, architecture, config_json)
    except ArchitectureError as error:
        raise CheckpointError(str(error)) from error
    layers, heads = architecture["num_layers"], architecture["num_attention_heads"]
    chunks = args.target_pp * (args.target_vpp or 1)
    if heads % args.target_tp:
        raise CheckpointError(f"--target-tp {args.target_tp} does not divide {heads} heads ({config_json})")
    if layers % chunks:
        raise CheckpointError(f"{layers} layers do not split into --target-pp x --target-vpp = {chunks} chunks")
    try:
        engine_hf = hf_config_from_engine(engine_config(converter_args(None, architecture=architecture)))
    except ValueError as error:  # the engine refuses the shape (e.g. a width not divisible by the expert ratio)
        raise CheckpointError(f"{config_json}: the engine cannot build this model: {error}") from error
    if args.direction == "hf-to-engine":
        check_hf_matches_engine(source.config, engine_hf, config_json, "the engine model of its architecture")
    else:
        recipe = SourceRecipe("hf-llama", os.path.abspath(args.source), config_fields(engine_hf), seed=args.seed,
                              copy_eos_to_pad=not args.no_copy_eos_to_pad)
        recipe.open()  # validates LLaMA dims against the engine model, keys and shapes
    if os.path.exists(args.output) and os.listdir(args.output):
        if not args.overwrite:
            raise CheckpointError(f"{args.output} exists and is not empty (pass --overwrite)")
        shutil.rmtree(args.output)
    return recipe, architecture


def hf_to_engine(args: argparse.Namespace) -> str:
    """Run the conversion on ``target_tp x target_pp`` local processes; returns the written ``iter_*`` folder."""
    import torch.multiprocessing as mp

    recipe, architecture = validate_hf_to_engine(args)
    world = args.target_tp * args.target_pp
    options = dict(architecture=architecture, tp=args.target_tp, pp=args.target_pp,
                   vpp=args.target_vpp, bf16=args.bf16, output=os.path.abspath(args.output))
    store_dir = tempfile.mkdtemp(prefix="libra_convert_")
    try:
        mp.start_processes(_convert_rank, args=(world, os.path.join(store_dir, "store"), options, recipe),
                           nprocs=world, join=True, start_method="spawn")
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    return os.path.join(options["output"], "iter_0000000")


# ------------------------------------------------------------------------------------------------ engine -> hf
def engine_to_hf(args: argparse.Namespace) -> str:
    from libra_megatron.checkpoint.engine_checkpoint import export_to_hf, resolve_checkpoint
    from libra_megatron.checkpoint.safe_io import CheckpointError

    source = resolve_checkpoint(args.source, args.ckpt_step)
    if os.path.exists(args.output) and not args.overwrite:
        raise CheckpointError(f"{args.output} already exists (pass --overwrite to replace it)")
    store_dir = tempfile.mkdtemp(prefix="libra_export_")
    _init_megatron(0, 1, os.path.join(store_dir, "store"), 1, 1, None)
    try:
        return export_to_hf(source, args.output, args.tokenizer_dir, args.vision_tokenizer_dir, DTYPES[args.dtype],
                            int(args.max_shard_size * 10**9), args.overwrite, show_progress=True)
    finally:
        _shutdown_megatron()
        shutil.rmtree(store_dir, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from libra_megatron.checkpoint.safe_io import CheckpointError

    started = time.perf_counter()
    try:
        out = engine_to_hf(args) if args.direction == "engine-to-hf" else hf_to_engine(args)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
