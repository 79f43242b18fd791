"""Which Libra model a run trains: a ``--model`` preset, the architecture flags, or the checkpoint it starts from.

Every architecture field has a Megatron-LM style flag (``--hidden-size``, ``--num-layers``, ``--vocab-size``, ...,
plus Libra's ``--vision-down-ratio``, ``--bridge-rank``, ``--clip-feature-size``, ``--num-codebooks``, ...).
Resolution, field by field:

1. a flag the user passed wins;
2. else the ``--model`` preset, when one is named;
3. else the architecture recorded in the checkpoint the run starts from (``--load`` when it holds a checkpoint,
   else ``--pretrained-checkpoint``), so ``--model`` is optional there;
4. else the ``tiny`` preset.

When the starting checkpoint records an architecture, everything the user passed (the preset's fields and the
flags) must agree with it; otherwise the run is refused with *every* differing field named. Validation writes the
resolved fields back as flags, and every engine checkpoint records its validated flags as plain JSON
(``run_config.json``, see ``checkpointing.py``), so the architecture is read back before any process group exists
and without unpickling anything.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Optional

DEFAULT_PRESET = "tiny"
# LibraConfig field -> trainer flag (argparse dest); the fields of every preset in libra_megatron/config.py
FIELD_FLAGS: Dict[str, str] = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
    "ffn_hidden_size": "ffn_hidden_size", "layernorm_epsilon": "norm_epsilon", "text_vocab_size": "vocab_size",
    "codebook_size": "codebook_size", "num_codebooks": "num_codebooks", "image_resolution": "image_resolution",
    "clip_feature_size": "clip_feature_size", "vision_down_ratio": "vision_down_ratio",
    "bridge_rank": "bridge_rank", "max_position_embeddings": "max_position_embeddings",
    "rotary_base": "rotary_base",
}
FLOAT_FIELDS = ("layernorm_epsilon", "rotary_base")


class ArchitectureError(ValueError):
    """The architecture the flags ask for does not match the checkpoint's (the message names every field)."""


def add_architecture_args(group: argparse._ArgumentGroup) -> None:
    """The architecture flags (all default to "not given")."""
    for field, dest in FIELD_FLAGS.items():
        if dest == "num_layers":
            continue  # --num-layers is declared with the model flags (also used by the GPT family)
        flag = "--" + dest.replace("_", "-")
        group.add_argument(flag, type=float if field in FLOAT_FIELDS else int, default=None,
                           help=f"Libra architecture: {field} (default: the --model preset or the checkpoint's)")


def _flag(field: str) -> str:
    """The trainer flag of an architecture field."""
    return "--" + FIELD_FLAGS[field].replace("_", "-")


def _same(field: str, a: Any, b: Any) -> bool:
    if field in FLOAT_FIELDS:
        return abs(float(a) - float(b)) <= 1e-12 * max(abs(float(a)), abs(float(b)), 1e-30)
    return int(a) == int(b)


def _checkpoint_folder(path: Optional[str]) -> Optional[str]:
    """The ``iter_*`` folder a trainer ``--load`` / ``--pretrained-checkpoint`` path would start from, if any."""
    if not path:
        return None
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    from libra_megatron.training.checkpointing import latest_checkpoint

    try:
        return latest_checkpoint(path)
    except (OSError, ValueError):
        return None


def read_architecture(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The Libra architecture recorded in a checkpoint (root or ``iter_*`` folder); None when it records none."""
    from libra_megatron.training.checkpointing import RUN_CONFIG_FILE

    folder = _checkpoint_folder(path)
    if folder is None or not os.path.isfile(os.path.join(folder, RUN_CONFIG_FILE)):
        return None
    file = os.path.join(folder, RUN_CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as handle:
            values = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ArchitectureError(f"{file}: cannot read the recorded run configuration: {error}") from error
    if not isinstance(values, dict) or values.get("model_family", "libra") != "libra":
        return None
    recorded = {field: values.get(dest) for field, dest in FIELD_FLAGS.items()}
    return None if any(v is None for v in recorded.values()) else recorded


def starting_checkpoint(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint a run starts from: ``--load`` when it holds one, else ``--pretrained-checkpoint``."""
    for path in (getattr(args, "load", None), getattr(args, "pretrained_checkpoint", None)):
        if _checkpoint_folder(path) is not None:
            return path
    return None


def requested_architecture(args: argparse.Namespace) -> Dict[str, Any]:
    """The fields the user asked for: the ``--model`` preset's (if named), overridden by the architecture flags
    given; each value paired with where it came from (``{field: (value, "--flag" or "--model NAME")}``)."""
    from libra_megatron.config import PRESETS

    preset_name = getattr(args, "model", None)
    if preset_name is not None and preset_name not in PRESETS:
        raise ArchitectureError(f"--model '{preset_name}' is not a Libra preset; known: {sorted(PRESETS)}")
    asked = {f: (PRESETS[preset_name][f], f"--model {preset_name}") for f in FIELD_FLAGS} if preset_name else {}
    for field, dest in FIELD_FLAGS.items():
        if getattr(args, dest, None) is not None:
            asked[field] = (getattr(args, dest), _flag(field))
    return asked


def check_against(asked: Dict[str, Any], actual: Dict[str, Any], source: str) -> None:
    """Refuse when any field the user asked for differs from ``actual`` (the model ``source`` holds); the message
    names every differing field with both values."""
    differing = [f for f, (value, _) in asked.items() if f in actual and not _same(f, value, actual[f])]
    if differing:
        details = "; ".join(f"{f}={asked[f][0]} from {asked[f][1]} but {actual[f]} there" for f in differing)
        raise ArchitectureError(
            f"{source} describes a different Libra architecture than asked for ({len(differing)} field"
            f"{'s' if len(differing) > 1 else ''}: {details}); drop --model and those flags to take its "
            "architecture, or use a matching checkpoint")


def resolve_architecture(args: argparse.Namespace) -> Dict[str, Any]:
    """The Libra architecture of the run described by ``args`` (see the module docstring); raises
    :class:`ArchitectureError` naming every field that differs from the starting checkpoint's."""
    from libra_megatron.config import PRESETS

    asked = requested_architecture(args)
    checkpoint = starting_checkpoint(args)
    recorded = read_architecture(checkpoint) if checkpoint else None
    if recorded is not None:
        check_against(asked, recorded, checkpoint)
        return dict(recorded)
    base = PRESETS[DEFAULT_PRESET]
    return {f: asked[f][0] if f in asked else base[f] for f in FIELD_FLAGS}


def architecture_flags(values: Dict[str, Any]) -> list:
    """Trainer flags that state ``values`` in full (for tools that build trainer arguments)."""
    flags = []
    for field, dest in FIELD_FLAGS.items():
        flags += ["--" + dest.replace("_", "-"), repr(float(values[field])) if field in FLOAT_FIELDS
                  else str(int(values[field]))]
    return flags
