"""Loading ``libra_megatron._C`` with one clear message when it is missing or stale.

Every op in ``libra_megatron.ops`` calls :func:`get_extension`; ``None`` means "use the PyTorch fallback".
Set ``LIBRA_REQUIRE_EXTENSION=1`` to turn a missing or stale build into an error (benchmarks, GPU checks),
or ``LIBRA_DISABLE_EXTENSION=1`` to force the fallbacks (tests compare both paths this way).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType
from typing import Optional

from libra_megatron.ops.csrc_hash import csrc_hash

logger = logging.getLogger(__name__)

BUILD_HINT = (
    "Build it with `make install` (or `pip install --no-build-isolation -e .` in the repository root); "
    "until then libra-megatron uses its pure-PyTorch fallbacks."
)


class ExtensionUnavailableError(RuntimeError):
    """Raised when the C++ extension is required (LIBRA_REQUIRE_EXTENSION=1) but missing or stale."""


def _source_dir() -> Optional[str]:
    """The ``csrc/`` folder of a source checkout next to the package, if there is one."""
    candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "csrc")
    return candidate if os.path.isdir(candidate) else None


def _problem_with(module: Optional[ModuleType], import_error: Optional[BaseException]) -> Optional[str]:
    if module is None:
        return f"libra_megatron._C is not built ({import_error}). {BUILD_HINT}"
    src = _source_dir()
    if src is not None:
        expected = csrc_hash(src)
        if getattr(module, "csrc_hash", None) != expected:
            return (
                f"libra_megatron._C is stale: built from csrc hash {getattr(module, 'csrc_hash', '?')}, "
                f"sources now hash to {expected}. {BUILD_HINT}"
            )
    return None


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    if os.environ.get("LIBRA_DISABLE_EXTENSION", "0") == "1":
        return None, "disabled by LIBRA_DISABLE_EXTENSION=1"
    module, error = None, None
    try:
        module = importlib.import_module("libra_megatron._C")
    except ImportError as exc:  # not built, or built against another torch
        error = exc
    problem = _problem_with(module, error)
    if problem is not None:
        return None, problem
    return module, None


def get_extension() -> Optional[ModuleType]:
    """Return the loaded, up-to-date extension module, or ``None`` (after one warning) to use fallbacks."""
    module, problem = _load()
    if module is None:
        if os.environ.get("LIBRA_REQUIRE_EXTENSION", "0") == "1":
            raise ExtensionUnavailableError(problem)
        _warn_once(problem)
    return module


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    if not message.startswith("disabled"):
        logger.warning(message)


def extension_status() -> str:
    """One line describing which implementation is in use (for logs and `make demo`)."""
    module, problem = _load()
    if module is None:
        return f"C++ extension: not used ({problem})"
    return f"C++ extension: loaded (cuda={module.with_cuda}, openmp={module.with_openmp}, hash={module.csrc_hash})"
