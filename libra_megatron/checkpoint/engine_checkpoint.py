"""Engine (megatron-core ``dist_checkpointing``) side of the converters.

* **Writing** (HF / HF LLaMA -> engine): each rank of the target TP x PP (x VPP) layout builds its model chunks
  exactly as the trainer does (``training.model_setup.build_model_chunks``), fills every local parameter from a
  lazy HF-key-space source through the model's name map (``hf_libra_names``: ``hf_to_engine`` then ``split_tp``),
  and saves with the trainer's own ``save_checkpoint`` (``<root>/iter_0000000`` + ``latest_checkpointed_iteration.txt``,
  atomic). A rank holds only its shard plus one global tensor at a time. The trainer starts from it with
  ``--pretrained-checkpoint <root>``, ``--load <root> --finetune`` or a plain ``--load <root>`` (iteration 0, no
  optimizer state: a fresh optimizer).
* **Reading** (engine -> HF): one process loads the checkpoint (saved at any layout; dist_checkpointing reshards)
  into a TP=1, PP=1 model with the trainer's ``load_checkpoint(weights_only=True)`` and yields HF tensors
  parameter by parameter (one model copy in memory; the HF writer holds at most a shard more).

The model shape comes from the trainer's flags (``--model`` preset, ``--num-layers``), which the trainer records in
every checkpoint (``args`` in the common state) and the converter records the same way.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch

from libra_megatron.checkpoint.safe_io import CheckpointError
from libra_megatron.hf_modeling.configuration_libra import LibraConfig as HFLibraConfig


class HFSource(Protocol):
    """Tensors in HF Libra key space (parameters; constant buffers are not needed)."""

    def keys(self) -> List[str]: ...

    def shape(self, key: str) -> Tuple[int, ...]: ...

    def get(self, key: str) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------ configuration
def converter_args(model: Optional[str], num_layers: Optional[int] = None, tp: int = 1, pp: int = 1,
                   vpp: Optional[int] = None, bf16: bool = False, stage: str = "instruct", device: str = "cpu",
                   architecture: Optional[Dict] = None) -> argparse.Namespace:
    """The trainer's flags for building (and recording) the Libra model at a layout, as ``pretrain_libra.py`` would:
    a ``--model`` preset (with ``--num-layers``) or a full ``architecture`` (``training/architecture.py`` fields),
    stated in full as architecture flags so the checkpoint records it."""
    from libra_megatron.training.architecture import FIELD_FLAGS, architecture_flags, resolve_architecture
    from libra_megatron.training.arguments import parse_args

    argv = ["--model-family", "libra", "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--train-iters", "0", "--mock-data", "--stage", stage,
            "--device", device, "--no-save-optim"]
    if model is not None:
        argv += ["--model", model]
    if architecture is not None:
        argv += architecture_flags(architecture)
    if num_layers is not None:
        argv += ["--num-layers", str(num_layers)]
    if vpp is not None:
        argv += ["--virtual-pipeline-model-parallel-size", str(vpp)]
    if bf16:
        argv.append("--bf16")
    args = parse_args(argv)
    for field, value in resolve_architecture(args).items():
        setattr(args, FIELD_FLAGS[field], value)
    return args


def args_from_checkpoint(common: Dict, path: str) -> argparse.Namespace:
    """Converter args (TP=1, PP=1, same model and precision) from a checkpoint's recorded trainer flags."""
    from libra_megatron.training.architecture import FIELD_FLAGS

    saved = common.get("args") or {}
    recorded = {field: saved.get(dest) for field, dest in FIELD_FLAGS.items()}
    if saved.get("model_family", "libra") != "libra" or (saved.get("model") is None and None in recorded.values()):
        raise CheckpointError(f"{path}: not a Libra engine checkpoint (recorded flags: model_family="
                              f"{saved.get('model_family')!r}, model={saved.get('model')!r})")
    if None not in recorded.values():
        return converter_args(None, architecture=recorded, bf16=bool(saved.get("bf16", False)))
    return converter_args(saved["model"], saved.get("num_layers"), bf16=bool(saved.get("bf16", False)))


def engine_config(args: argparse.Namespace):
    """The engine ``LibraConfig`` the trainer would build for ``args`` (without random init: every weight is loaded)."""
    from libra_megatron.training.families import get_family

    config = get_family("libra").build_config(args)
    config.perform_initialization = False
    return config


def hf_config_from_engine(config) -> HFLibraConfig:
    """The HF ``LibraConfig`` of an engine ``LibraConfig`` (ids from its ``LibraVocab``)."""
    vocab = config.vocab
    return HFLibraConfig(
        vocab_size=config.text_vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.layernorm_epsilon,
        rope_theta=float(config.rotary_base), initializer_range=config.init_method_std,
        pad_token_id=vocab.pad_id, bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id,
        newline_token_id=vocab.newline_id, vision_vocab_size=vocab.vision_vocab_size,
        vision_codebook_num=config.num_codebooks, max_vision_token_length=vocab.image_positions,
        image_feature_resolution=config.image_resolution, contiguous_signal_size=config.clip_feature_size,
        vision_down_ratio=config.vision_down_ratio, bridge_rank=config.bridge_rank,
    )


SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vision_vocab_size", "vision_codebook_num", "max_vision_token_length", "image_feature_resolution",
                "contiguous_signal_size", "vision_down_ratio", "bridge_rank", "rms_norm_eps", "rope_theta",
                "newline_token_id")


def check_hf_matches_engine(hf: HFLibraConfig, engine: HFLibraConfig, source: str, model: str) -> None:
    """The HF config must describe the engine model being built; the message names every differing field and
    both values."""
    differing = []
    for field in SHAPE_FIELDS:
        a, b = getattr(hf, field), getattr(engine, field)
        if (abs(a - b) > 1e-12 * max(abs(a), abs(b))) if isinstance(a, float) else a != b:
            differing.append(f"{field}={a} but {model} builds {field}={b}")
    if differing:
        raise CheckpointError(f"{source}: " + "; ".join(differing))


def architecture_from_hf(hf: HFLibraConfig) -> Dict[str, object]:
    """The engine architecture (``training/architecture.py`` fields) an HF Libra ``config.json`` describes."""
    return dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size, layernorm_epsilon=float(hf.rms_norm_eps), text_vocab_size=hf.vocab_size,
        codebook_size=hf.vision_vocab_size - 2, num_codebooks=hf.vision_codebook_num,
        image_resolution=hf.image_feature_resolution, clip_feature_size=hf.contiguous_signal_size,
        vision_down_ratio=hf.vision_down_ratio, bridge_rank=hf.bridge_rank,
        max_position_embeddings=hf.max_position_embeddings, rotary_base=float(hf.rope_theta),
    )


# LLaMA config.json field -> the architecture field it states
LLAMA_ARCHITECTURE_FIELDS = {
    "num_hidden_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
    "intermediate_size": "ffn_hidden_size", "vocab_size": "text_vocab_size",
    "max_position_embeddings": "max_position_embeddings", "rope_theta": "rotary_base",
}


def architecture_from_llama(llama: Dict[str, object], libra_fields: Dict[str, object]) -> Dict[str, object]:
    """A Libra architecture on a LLaMA-2 ``config.json``: its text dimensions, the vision fields and the RMSNorm
    epsilon from ``libra_fields`` (a preset's or the flags'; released Libra uses 1e-6 whatever LLaMA's file says)."""
    values = dict(libra_fields)
    for llama_field, field in LLAMA_ARCHITECTURE_FIELDS.items():
        if llama.get(llama_field) is not None:
            values[field] = float(llama[llama_field]) if field == "rotary_base" else int(llama[llama_field])
    return values


# ------------------------------------------------------------------------------------------------- writing
def _layer_offset(chunk: torch.nn.Module) -> int:
    layers = chunk.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def build_chunks(args: argparse.Namespace, config) -> List[torch.nn.Module]:
    """This rank's model chunks, built as the trainer builds them."""
    from libra_megatron.training.families import get_family
    from libra_megatron.training.model_setup import build_model_chunks

    return build_model_chunks(get_family("libra"), args, config)


def fill_from_hf(chunks: Sequence[torch.nn.Module], config, source: HFSource,
                 progress: Optional[Callable[[str], None]] = None) -> int:
    """Copy this rank's share of every parameter from ``source``; returns the number of parameters filled."""
    from megatron.core import parallel_state as ps

    from libra_megatron.checkpoint.hf_libra_names import global_layer_name, hf_names, hf_to_engine, split_tp

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    padded = config.padded_text_vocab_size()
    count = 0
    with torch.no_grad():
        for chunk in chunks:
            offset = _layer_offset(chunk)
            for name, param in chunk.named_parameters():
                global_name = global_layer_name(name, offset)
                needed = hf_names(global_name, config.num_codebooks)
                full = hf_to_engine({k: source.get(k) for k in needed}, [global_name], config, padded)[global_name]
                local = split_tp(global_name, full, tp)[rank]
                if tuple(local.shape) != tuple(param.shape):
                    raise CheckpointError(f"{global_name}: expected local shape {list(param.shape)} at TP rank {rank}, "
                                          f"found {list(local.shape)} from {list(needed)}")
                param.copy_(local)
                count += 1
                if progress is not None:
                    progress(global_name)
    return count


class _StartOfSchedule:
    """The LR-schedule state of step 0 (megatron's ``OptimizerParamScheduler`` keys). The trainer overrides the
    values with its own flags (``override_opt_param_scheduler``), so a plain ``--load`` starts at step 0."""

    def state_dict(self) -> Dict:
        return {"max_lr": 0.0, "min_lr": 0.0, "lr_warmup_steps": 0, "lr_decay_steps": 1, "lr_decay_style": "constant",
                "num_steps": 0}


def save_converted(root: str, chunks: Sequence[torch.nn.Module], args: argparse.Namespace) -> str:
    """Save as the trainer does (iteration 0, no optimizer); returns the ``iter_0000000`` folder."""
    from libra_megatron.training.checkpointing import save_checkpoint

    return save_checkpoint(root, 0, 0, list(chunks), None, _StartOfSchedule(), args)


def convert_on_this_rank(root: str, args: argparse.Namespace, make_source: Callable[[], HFSource],
                         show_progress: bool = False) -> str:
    """One rank of an HF -> engine conversion (process group and model-parallel state already initialised)."""
    config = engine_config(args)
    source = make_source()
    chunks = build_chunks(args, config)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(1 for c in chunks for _ in c.parameters()), desc="hf -> engine (rank 0)", unit="param")
    fill_from_hf(chunks, config, source, progress=(lambda _: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    return save_converted(root, chunks, args)


# ------------------------------------------------------------------------------------------------- reading
def resolve_checkpoint(path: str, step: Optional[int] = None) -> str:
    """A trainer ``--save`` root (latest marker, or ``step``) or an ``iter_*`` folder -> the ``iter_*`` folder."""
    from libra_megatron.training.checkpointing import checkpoint_dir, latest_checkpoint

    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    found = checkpoint_dir(path, step) if step is not None else latest_checkpoint(path)
    if found is None or not os.path.isfile(os.path.join(found, "metadata.json")):
        raise CheckpointError(f"{path}: no finished engine checkpoint" + (f" for step {step}" if step is not None else ""))
    return found


def load_for_export(path: str) -> Tuple[torch.nn.Module, object, argparse.Namespace]:
    """(TP=1/PP=1 model with the checkpoint's weights, engine config, args); model-parallel state must be 1x1."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from libra_megatron.training.checkpointing import load_checkpoint

    if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("engine -> HF export runs with TP=1, PP=1 (the checkpoint reshards on load)")
    common = dist_checkpointing.load_common_state_dict(path)
    args = args_from_checkpoint(common, path)
    config = engine_config(args)
    chunks = build_chunks(args, config)
    _check_saved_shapes(path, chunks[0])
    load_checkpoint(path, chunks, None, None, args, weights_only=True)
    return chunks[0], config, args


def _check_saved_shapes(path: str, model: torch.nn.Module) -> None:
    """Before loading: every tensor the model needs exists in the checkpoint with the same global shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    saved = dist_checkpointing.load_tensors_metadata(path)
    expected = {}
    for value in nested_values(model.sharded_state_dict()):
        if isinstance(value, ShardedTensorFactory):
            value = value.build()
            value = value[0] if isinstance(value, list) else value
        if isinstance(value, ShardedTensor):
            expected[value.key] = (tuple(value.global_shape), value.allow_shape_mismatch)
    for key, (shape, flexible) in expected.items():
        if key not in saved:
            raise CheckpointError(f"{path}: tensor {key!r} is missing from the checkpoint")
        found = tuple(saved[key].global_shape if hasattr(saved[key], "global_shape") else saved[key].shape)
        if found != shape and not flexible:
            raise CheckpointError(f"{path}: {key}: expected shape {list(shape)}, found {list(found)}")


def engine_to_hf_tensors(model: torch.nn.Module, config) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF-named tensors of a TP=1/PP=1 engine model, parameter by parameter (padding stripped, fusions split)."""
    from libra_megatron.checkpoint.hf_libra_names import engine_to_hf

    for name, param in model.named_parameters():
        for key, tensor in engine_to_hf({name: param.detach()}, config).items():
            yield key, tensor


def export_to_hf(source: str, output: str, tokenizer_dir: Optional[str] = None,
                 vision_tokenizer_dir: Optional[str] = None, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = 5 * 10**9, overwrite: bool = False, show_progress: bool = False) -> str:
    """Engine checkpoint (trainer ``--save`` root or ``iter_*`` folder) -> HF Libra folder, in a process whose
    model-parallel state is 1 x 1."""
    from libra_megatron.checkpoint.hf_libra import hf_key_shapes, write_hf_libra

    model, config, _ = load_for_export(resolve_checkpoint(source))
    hf_config = hf_config_from_engine(config)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(hf_key_shapes(hf_config)), desc="engine -> hf", unit="tensor")
    try:
        return write_hf_libra(output, hf_config, engine_to_hf_tensors(model, config), tokenizer_dir=tokenizer_dir,
                              vision_tokenizer_dir=vision_tokenizer_dir, overwrite=overwrite, dtype=dtype,
                              max_shard_bytes=max_shard_bytes, progress=(lambda _: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
