"""Process groups and seeds for a training process started by torchrun (or as a single process).

Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` as torchrun sets them, picks the
device (CUDA when present unless ``--device cpu``) and backend (nccl on GPU, gloo on CPU, where
:func:`~libra_megatron.utils.cpu.enable_cpu_megatron` is switched on), then builds megatron-core's TP/PP/DP groups.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
from typing import Tuple

import numpy as np
import torch


def world_from_env() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain ``python`` start."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(args: argparse.Namespace) -> str:
    """The run's device (``args.device``, resolved by validation); enables the CPU megatron redirects on CPU."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available")
    if device == "cpu":
        from libra_megatron.utils.cpu import enable_cpu_megatron

        enable_cpu_megatron()
    return device


def initialize_distributed(args: argparse.Namespace) -> None:
    """Create the default process group (unless one exists) and megatron-core's model-parallel groups."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    rank, world_size, local_rank = world_from_env()
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    backend = args.distributed_backend or ("nccl" if args.device == "cuda" else "gloo")
    if not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        timeout = datetime.timedelta(minutes=args.distributed_timeout_minutes)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                store=elastic_attempt_store(world_size, timeout))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            distributed_timeout_minutes=args.distributed_timeout_minutes,
        )


def elastic_attempt_store(world_size: int, timeout: datetime.timedelta):
    """Under torchrun's elastic agent, a client of the agent's store with keys private to this restart attempt;
    ``None`` otherwise (plain ``env://``). torch 2.13 hands restarted workers the agent's c10d rendezvous store
    without an attempt prefix ("a new TCPStore for every retry" no longer holds), so a restarted group reads the
    gloo addresses of the dead group and hangs in ``connectFullMesh`` (docs/design.md#training-faults)."""
    import torch.distributed as dist

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"/libra/attempt_{restart}", store)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (single-process starts, tests and the demo's torchrun)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG tracker (Megatron-LM's ``_set_random_seed``).

    The seed is offset per pipeline stage like Megatron-LM does, so stages draw different dropout masks; model
    weights never depend on it when training starts from a checkpoint (``--load``/``--pretrained-checkpoint``).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def is_last_rank() -> bool:
    """The rank that logs (Megatron-LM convention: the last global rank sits on the last pipeline stage)."""
    import torch.distributed as dist

    return dist.get_rank() == dist.get_world_size() - 1


def print_rank_0(message: str) -> None:
    """Print once per job (global rank 0)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def print_rank_last(message: str) -> None:
    """Print from the logging rank only."""
    import torch.distributed as dist

    if not dist.is_initialized() or is_last_rank():
        print(message, flush=True)
