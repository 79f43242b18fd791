"""The configuration of one run, fixed once :func:`~libra_megatron.training.arguments.validate_args` has checked it.

:class:`RunConfig` is a frozen view of the parsed flags: it reads exactly like the ``argparse.Namespace``
(Megatron-LM flag names as attributes, ``vars()``, ``getattr(args, name, default)``), but assigning or deleting an
attribute raises :class:`FrozenConfigError`, and list values are :class:`FrozenList` (equal to plain lists, but
not changeable in place). Nothing is listed per flag, so a flag added to the parser is covered without further
work. Values derived from the flags (``data_parallel_size``, ``num_microbatches``, the data blends, the device)
are filled in by validation *before* the freeze; values derived from other objects live on those objects (the
CLIP geometry on the vision tower, FLOP constants on the family's counter, layouts on the model config).

A different configuration is a new object: :meth:`RunConfig.replace` (the dry run plans layouts this way).
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Iterable


class FrozenConfigError(AttributeError):
    """An attempt to change the run configuration after validation."""


class FrozenList(list):
    """A list whose contents cannot change (compares, serialises and pickles like a plain list)."""

    def __init__(self, values: Iterable[Any] = ()) -> None:
        super().__init__(freeze_value(v) for v in values)

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise FrozenConfigError("the run configuration is frozen after validation; its lists cannot change")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce_ex__(self, protocol: int) -> Any:
        return FrozenList, (list(self),)

    def __copy__(self) -> "FrozenList":
        return self

    def __deepcopy__(self, memo: Dict[int, Any]) -> "FrozenList":
        return self


def freeze_value(value: Any) -> Any:
    """Lists become :class:`FrozenList` (recursively); tuples keep their frozen items; everything else as is."""
    if isinstance(value, list) and not isinstance(value, FrozenList):
        return FrozenList(value)
    if isinstance(value, tuple) and any(isinstance(v, list) for v in value):
        return tuple(freeze_value(v) for v in value)
    return value


class RunConfig(argparse.Namespace):
    """The validated flags of a run, read-only (see the module docstring)."""

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, freeze_value(value))

    @classmethod
    def freeze(cls, namespace: argparse.Namespace) -> "RunConfig":
        """A frozen copy of ``namespace`` (which itself stays as it is)."""
        return cls(**vars(namespace))

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenConfigError(f"the run configuration is frozen after validation: cannot set '{name}' "
                                f"(derive a new configuration with RunConfig.replace, or keep the value on the "
                                "object that owns it)")

    def __delattr__(self, name: str) -> None:
        raise FrozenConfigError(f"the run configuration is frozen after validation: cannot delete '{name}'")

    def replace(self, **changes: Any) -> "RunConfig":
        """A new frozen configuration with ``changes`` applied (this one is unchanged)."""
        return RunConfig(**{**vars(self), **changes})

    def thawed(self) -> argparse.Namespace:
        """A plain, changeable ``Namespace`` copy (for code that builds a *new* configuration from this one)."""
        return argparse.Namespace(**{k: list(v) if isinstance(v, FrozenList) else v for k, v in vars(self).items()})

    def __reduce_ex__(self, protocol: int) -> Any:
        return _rebuild, (dict(vars(self)),)

    def __copy__(self) -> "RunConfig":
        return self

    def __deepcopy__(self, memo: Dict[int, Any]) -> "RunConfig":
        return self


def _rebuild(values: Dict[str, Any]) -> RunConfig:
    return RunConfig(**values)
