"""Which :class:`LibraModel` parameters each training stage trains (docs/architecture.md#trainable-parameters).

``pretrain`` trains the vision side only: exactly the parameters whose released HF names contain "vision". In
engine names those are the parameters named ``vision*`` or ``*bridge*`` (every bridge is a ``vision_*_bridge_*``
in the HF layout, also the one on text keys); ``tests/model/test_config_and_counts.py`` checks the two rules agree
parameter by parameter through the HF name map. ``instruct`` trains everything.
"""
from __future__ import annotations

TRAINING_STAGES = ("pretrain", "instruct")


def is_trainable_in_stage(engine_name: str, stage: str) -> bool:
    """Whether the engine parameter ``engine_name`` (``LibraModel.named_parameters()`` name) trains in ``stage``."""
    if stage == "instruct":
        return True
    if stage != "pretrain":
        raise ValueError(f"training stage must be one of {TRAINING_STAGES}, got {stage!r}")
    return "vision" in engine_name or "bridge" in engine_name
