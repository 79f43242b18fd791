"""Import of the released Libra vision tokenizer (``YifanXu/libra-*``: ``vision_tokenizer_config.yaml`` + ``vqgan.ckpt``).

``vqgan.ckpt`` is a pickle (a Lightning-style dict whose ``state_dict`` holds CLIP under
``encoder.vision_tower.vision_model.*``, ``quant_conv``, ``quantize`` (LFQ), ``post_quant_conv``, ``decoder`` and the
training-only ``loss.*``). It is opened with ``torch.load(weights_only=True)`` only: a file that needs arbitrary
unpickling is refused with instructions, never executed. A ``.safetensors`` file with the same keys works too.

Key mapping to :class:`ImageTokenizer`: ``encoder.vision_tower.vision_model.X`` -> ``encoder.vision_tower.X``
(transformers >= 5 has no ``vision_model`` level); CLIP blocks past ``max(select_layer)`` (23, 24), ``loss.*``,
``quantize.mask`` and ``position_ids`` buffers are dropped; everything else must match exactly.

The CLIP architecture comes from ``clip_folder`` (or the folder named by ``ddconfig.encoder_name`` inside the
release folder) when it has a ``config.json``, else from the published ViT-L/14-336 config; every weight shape is
checked against it.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any, Dict, Optional, Tuple, Union

import torch
import yaml

from libra_megatron.tokenizer.clip_encoder import LIBRA_SELECT_LAYERS, VIT_L14_336, load_clip_vision_config
from libra_megatron.tokenizer.decoder import DecoderConfig

logger = logging.getLogger(__name__)

RELEASED_CONFIG_NAME = "vision_tokenizer_config.yaml"
_CLIP_PREFIX = "encoder.vision_tower."


def read_released_config(folder: str) -> Dict[str, Any]:
    """Parse ``vision_tokenizer_config.yaml`` with errors that name the file and field."""
    path = os.path.join(folder, RELEASED_CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the released tokenizer config {path!r}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise ValueError(f"{path}: field 'params' is missing or not a mapping")
    params = data["params"]
    if not isinstance(params.get("ddconfig"), dict):
        raise ValueError(f"{path}: field 'params.ddconfig' is missing or not a mapping")
    for name in ("embed_dim",):
        if name not in params:
            raise ValueError(f"{path}: field 'params.{name}' is missing")
    return data


def load_weights_only(path: str) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of a released checkpoint, via safetensors or ``torch.load(weights_only=True)`` only."""
    if not os.path.isfile(path):
        raise ValueError(f"released tokenizer weights {path!r} are missing")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(exc).__name__)
        raise ValueError(
            f"refusing to load {path!r}: it is not loadable with torch.load(weights_only=True) ({reason}). "
            "libra-megatron never unpickles arbitrary objects from a file. If you trust the file, convert it once "
            "outside libra-megatron: save the tensors of its 'state_dict' with safetensors as vqgan.safetensors, "
            "then set params.ckpt_path to vqgan.safetensors (or pass that file to tools/convert_vision_tokenizer.py)."
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a dict of tensors (or a dict with a 'state_dict' of tensors)")
    return data


def map_released_state(state: Dict[str, torch.Tensor], clip_depth: int) -> Dict[str, torch.Tensor]:
    """Rename released keys to :class:`ImageTokenizer` keys and drop what it does not hold (see module doc)."""
    mapped: Dict[str, torch.Tensor] = {}
    block = re.compile(r"encoder\.layers\.(\d+)\.")
    for key, value in state.items():
        if key.startswith("loss.") or key == "quantize.mask" or key.endswith("position_ids"):
            continue
        if key.startswith(_CLIP_PREFIX):
            rest = key[len(_CLIP_PREFIX):]
            if rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            match = block.match(rest)
            if match and int(match.group(1)) >= clip_depth:
                continue  # blocks after the last selected layer are never run
            key = _CLIP_PREFIX + rest
        mapped[key] = value
    return mapped


def read_released(
    folder: Union[str, os.PathLike], clip_folder=None
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], str]:
    """(``ImageTokenizerConfig`` fields, weights in ``ImageTokenizer`` key space, weights path) of a released folder.

    :meth:`ImageTokenizer.from_released` builds the tokenizer from these (see the module docstring).
    """
    folder = os.fspath(folder)
    data = read_released_config(folder)
    params, ddconfig = data["params"], data["params"]["ddconfig"]
    config_path = os.path.join(folder, RELEASED_CONFIG_NAME)
    select = ddconfig.get("select_layer", list(LIBRA_SELECT_LAYERS))
    if not isinstance(select, (list, tuple)) or not select:
        raise ValueError(f"{config_path}: field 'params.ddconfig.select_layer' must be a list of CLIP blocks, got {select!r}")
    select_layers = tuple(int(v) for v in select)
    fields = dict(
        clip=_released_clip_config(folder, ddconfig.get("encoder_name"), clip_folder),
        select_layers=select_layers,
        embed_dim=int(params["embed_dim"]),
        codebook_size=int(params.get("codebook_size", 512)),
        num_codebooks=int(params.get("num_codebook", 2)),
        decoder=DecoderConfig.from_dict(ddconfig).to_dict(),
    )
    weights = os.path.join(folder, str(params.get("ckpt_path") or "vqgan.ckpt"))
    # the tokenizer runs CLIP only up to the deepest selected block (ClipFeatureEncoder)
    state = map_released_state(load_weights_only(weights), max(select_layers))
    return fields, state, weights


def _released_clip_config(folder: str, encoder_name: Optional[str], clip_folder) -> Dict[str, Any]:
    candidates = [os.fspath(clip_folder)] if clip_folder is not None else []
    if encoder_name:
        candidates.append(os.path.join(folder, str(encoder_name)))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "config.json")):
            loaded = load_clip_vision_config(candidate)
            return {name: getattr(loaded, name) for name in VIT_L14_336}
    if clip_folder is not None:
        raise ValueError(f"CLIP folder {os.fspath(clip_folder)!r} has no config.json")
    logger.info("no CLIP config.json found next to %s; using the published ViT-L/14-336 vision config", folder)
    return dict(VIT_L14_336)
