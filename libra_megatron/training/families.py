"""The built-in model families by ``--model-family`` name (the loop itself only knows :class:`ModelFamily`)."""
from __future__ import annotations

from libra_megatron.training.model_family import ModelFamily

FAMILY_NAMES = ("gpt", "libra")


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; its model code is imported only when it is asked for."""
    if name == "libra":
        from libra_megatron.training.libra_family import libra_family

        return libra_family()
    if name == "gpt":
        from libra_megatron.training.gpt_family import gpt_family

        return gpt_family()
    raise ValueError(f"unknown --model-family {name!r}; known: {list(FAMILY_NAMES)}")
