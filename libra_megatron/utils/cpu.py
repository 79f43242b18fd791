"""Opt-in: run megatron-core's TP/PP/DP code over gloo on a CPU-only torch.

megatron-core 0.19.2 hard-wires a handful of CUDA calls. This module is the **only** place in
libra-megatron that redirects them, and :func:`enable_cpu_megatron` refuses to do anything when CUDA is
available. Tests and the CPU demo call it in every process, before building models; production GPU
runs never do.

Each redirect below was shown necessary on 0.19.2 (see ``docs/architecture.md#cpu-megatron``):

1. ``torch.cuda.current_device()`` -> ``cpu``: workspace and comm buffers (tensor_parallel/mappings.py,
   layers.py, utils.py GlobalMemoryBuffer, p2p_communication.py).
2. ``torch.cuda.synchronize()`` -> no-op: after pipeline p2p and in the dist-checkpoint writer.
3. The CUDA RNG tracker -> a tracker over the CPU generator (``model_parallel_cuda_manual_seed`` and the
   fork in every attention call).
4. A ``torch`` stand-in inside the modules that write ``device="cuda"`` literally (schedules, optimizer,
   clip_grads, grad buffers, grad-norm utils, tensor_parallel.data): factories map cuda -> cpu.
5. CUDA streams/events -> no-op stand-ins (DDP grad-sync bookkeeping).
6. ``Tensor.type()`` called *from megatron code* on a CPU tensor reports the ``torch.cuda.*`` string the
   optimizer and grad clipping assert on; every other caller sees the true type.
7. ``WrappedTorchNorm`` accepts ``sequence_parallel=True`` (tags params like Apex does) so megatron's
   own local spec works under SP in parity tests.
8. ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> no-ops: activation
   recompute (``CheckpointFunction`` via ``_get_all_rng_states``/``_fork_rng``, random.py L525-553) saves and
   restores the CUDA generator; on CPU the generator it needs is the CPU one, which it saves separately.

If ``triton`` is not installed, importing this module also registers a stand-in for the one megatron
module that imports it unconditionally (MoE paged-stash kernels), so ``import megatron.core`` works.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from typing import Any, Dict

import torch

_ENABLED = False

_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.tensor_parallel.data",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
    "megatron.core.transformer.utils",  # get_default_causal_mask (mask=None path)
)


def _register_triton_standin() -> None:
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if importlib.util.find_spec("triton") is not None or name in sys.modules:
        return
    module = types.ModuleType(name)
    module.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MoE paged-stash Triton kernels are not available on a CPU-only install")

    module.paged_stash_copy_kernel = module.paged_stash_pop_kernel = _unavailable
    sys.modules[name] = module


if not torch.cuda.is_available():
    _register_triton_standin()


class CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker API over the CPU default generator."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_: set = set()

    def get_states(self) -> Dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


class _NoOpEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _NoOpStream(_NoOpEvent):
    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NoOpEvent()

    @staticmethod
    def priority_range() -> tuple:
        return (0, 0)


def _to_cpu_if_cuda(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    resolved = device if isinstance(device, torch.device) else torch.device(device)
    return torch.device("cpu") if resolved.type == "cuda" else resolved


class _CpuTorchNamespace:
    """Stands in for the name ``torch`` inside one megatron module: factories map cuda -> cpu."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint")

    def __init__(self) -> None:
        for name in self._FACTORIES:
            factory = getattr(torch, name)

            def redirected(*args: Any, _factory: Any = factory, **kwargs: Any) -> torch.Tensor:
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_if_cuda(kwargs["device"])
                return _factory(*args, **kwargs)

            setattr(self, name, redirected)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _patch_tensor_type() -> None:
    original = torch.Tensor.type

    def type_for_megatron(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
        if dtype is None and not kwargs:
            name = original(self)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if self.device.type == "cpu" and caller.startswith("megatron."):
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_for_megatron


def _patch_torch_norm_for_sequence_parallel() -> None:
    from megatron.core.transformer import torch_norm

    def build(cls: type, config: Any, hidden_size: int, eps: float = 1e-5, *args: Any, **kwargs: Any):
        norm_class = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_class(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = build


def _patch_checkpoint_rng_state() -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None


def enable_cpu_megatron() -> bool:
    """Apply the redirects once per process. Returns False (and changes nothing) when CUDA is available."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _ENABLED = True
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *args, **kwargs: None

    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    for module_name in _CUDA_LITERAL_MODULES:
        importlib.import_module(module_name).torch = _CpuTorchNamespace()

    stream = _NoOpStream()
    torch.cuda.current_stream = lambda *args, **kwargs: stream
    torch.cuda.default_stream = lambda *args, **kwargs: stream
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None

    _patch_tensor_type()
    _patch_torch_norm_for_sequence_parallel()
    _patch_checkpoint_rng_state()
    return True


def cpu_megatron_enabled() -> bool:
    """Whether :func:`enable_cpu_megatron` is active in this process."""
    return _ENABLED
