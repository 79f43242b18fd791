"""The Libra model on megatron-core (see docs/design.md, "Model").

The names below load on first use (PEP 562), so importing a light submodule (``fusions``, ``attention_inputs``,
``routing``) does not import megatron-core."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LibraModel", "ModalityRouting", "libra_loss_reduction"]

_HOMES = {"LibraModel": "libra_megatron.model.libra_model", "ModalityRouting": "libra_megatron.model.routing",
          "libra_loss_reduction": "libra_megatron.model.output"}


def __getattr__(name: str) -> Any:
    """``LibraModel``, ``ModalityRouting`` and ``libra_loss_reduction``, imported from their modules on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
