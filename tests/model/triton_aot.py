"""Compile the layer's Triton kernels for real GPUs on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``, used by tests/model/fused_kernel_checks.py) runs a kernel as numpy and
accepts code that the GPU compiler refuses. This module closes that gap in two steps:

1. ``record_launches(path)``: under the interpreter, every kernel launch made by the real launchers is written down
   (kernel, argument kinds, constexpr values).
2. ``python tests/model/triton_aot.py RECORD``: without the interpreter, each kernel's code paths (one launch per
   combination of boolean constexprs, at the largest recorded sizes: the 7B shapes) are compiled ahead of
   time (``triton.compile`` on an ``ASTSource``) to a cubin for sm_90 (H100/H200) in bf16, the recipe's dtype (each
   kernel's first launch also in the recorded dtype); Triton ships its own ptxas, so no GPU or driver is needed.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import sys
from typing import Any, Dict, Iterator, List, Tuple

KERNEL_MODULES = ("libra_megatron.model.attention_inputs", "libra_megatron.model.fusions")

_POINTER_TYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
                  "torch.int64": "i64", "torch.int32": "i32", "torch.bool": "i1"}
_FLOATS = ("fp32", "bf16", "fp16")


def _kind(value: Any) -> Dict[str, Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return {"pointer": _POINTER_TYPES[str(value.dtype)]}
    if isinstance(value, bool) or value is None:
        return {"constant": value}
    if isinstance(value, int):
        return {"int": "i64" if abs(value) >= 2**31 else "i32"}
    if isinstance(value, float):
        return {"float": "fp32"}
    raise TypeError(f"unsupported kernel argument {value!r}")


@contextlib.contextmanager
def record_launches(path: str) -> Iterator[None]:
    """Under ``TRITON_INTERPRET=1``: write every kernel launch's (kernel, argument kinds, constexprs) to ``path``."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: Dict[str, Dict[str, Any]] = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kinds = {name: _kind(value) for name, value in zip(self.arg_names, args)}
        kinds.update({name: {"constexpr": value} for name, value in kwargs.items()})
        launch = {"module": self.fn.__module__, "kernel": self.fn.__name__, "args": kinds}
        seen[json.dumps(launch, sort_keys=True)] = launch
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(list(seen.values()), handle, indent=1)


def launched_kernels() -> List[str]:
    """``module.name`` of every Triton kernel the package launches (a jit function no other kernel calls)."""
    import triton

    kernels: List[Tuple[str, str, str]] = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.JITFunction):
                kernels.append((module_name, name, value.src))
    sources = " ".join(src for _, _, src in kernels)
    return sorted(f"{m}.{n}" for m, n, _ in kernels if sources.count(f"{n}(") == 1)  # only its own definition


def signature(launch: Dict[str, Any], float_type: str) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """Triton's (signature, constexprs) for a recorded launch, with floating-point pointers as ``float_type``."""
    types: Dict[str, str] = {}
    constants: Dict[str, Any] = {}
    for name, kind in launch["args"].items():
        if "pointer" in kind:
            types[name] = "*" + (float_type if kind["pointer"] in _FLOATS else kind["pointer"])
        elif "int" in kind:
            types[name] = kind["int"]
        elif "float" in kind:
            types[name] = kind["float"]
        else:
            types[name] = "constexpr"
            constants[name] = kind.get("constexpr", kind.get("constant"))
    return types, constants


def code_paths(launches: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One launch per kernel and code path (its boolean/None constexprs: forward or backward, query order, ...),
    the one with the largest sizes (the 7B shapes when recorded): what the GPU compiler has to accept."""
    chosen: Dict[Tuple, Dict[str, Any]] = {}
    for launch in launches:
        values = {k: v.get("constexpr", v.get("constant")) for k, v in launch["args"].items()
                  if "constexpr" in v or "constant" in v}
        path = (launch["module"], launch["kernel"],
                tuple(sorted((k, v) for k, v in values.items() if isinstance(v, bool) or v is None)))
        size = sum(v for v in values.values() if isinstance(v, int) and not isinstance(v, bool))
        best = chosen.get(path)
        if best is None or size > best[0]:
            chosen[path] = (size, launch)
    return [launch for _, launch in chosen.values()]


def compile_launches(launches: List[Dict[str, Any]], capability: int = 90) -> List[str]:
    """Compile each launch to a cubin for ``sm_<capability>`` in bf16 (the recipe's dtype), and each kernel's
    first launch also in its recorded dtype; the compiled ``module.kernel`` names (raises on the first kernel the
    compiler refuses)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    done = set()
    for launch in launches:
        kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        name = f"{launch['module']}.{launch['kernel']}"
        recorded = {k["pointer"] for k in launch["args"].values() if k.get("pointer") in _FLOATS}
        for float_type in sorted({"bf16"} if name in done else {"bf16", *recorded}):
            types, constants = signature(launch, float_type)
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constants), target=target)
            except Exception as error:
                raise RuntimeError(f"{launch['module']}.{launch['kernel']} does not compile for sm_{capability} "
                                   f"({float_type}, {constants}): {error}") from error
            if not compiled.asm.get("cubin"):
                raise RuntimeError(f"{launch['kernel']}: no cubin for sm_{capability}")
        done.add(name)
    return sorted(done)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        recorded = json.load(handle)
    compiled = compile_launches(code_paths(recorded))
    expected = launched_kernels()
    missing = sorted(set(expected) - set(compiled))
    if missing:
        raise SystemExit(f"kernels never launched by the checks, so never compiled: {missing}")
    print(f"compiled for sm_90: {len(code_paths(recorded))} code paths of {len(recorded)} recorded launches of "
          f"{', '.join(compiled)}")
