"""Shared helpers of the training tests: flags for tiny runs, and reading the per-step records back."""
from __future__ import annotations

from typing import Dict, List, Sequence

BASE_FLAGS = [
    "--model-family", "gpt", "--model", "gpt-tiny", "--seq-length", "16", "--num-workers", "0",
    "--lr", "1e-2", "--lr-warmup-iters", "0", "--seed", "1234", "--log-interval", "1",
]


def make_args(flags: Sequence[str], world_size: int, mock_data: bool = True):
    """Parsed and validated flags for a tiny run on ``world_size`` ranks (``--mock-data`` unless told not to)."""
    from libra_megatron.training.arguments import parse_args, validate_args
    from libra_megatron.training.data_stream import dataset_files
    from libra_megatron.training.families import get_family

    args = parse_args(list(BASE_FLAGS) + (["--mock-data"] if mock_data else []) + list(flags))
    return validate_args(args, world_size, get_family(args.model_family).shape(args), dataset_files)


def losses(history_per_rank: List[List[Dict]], key: str = "lm_loss") -> List[float]:
    """The per-step series of ``key`` (a loss by default) from whichever rank logged it (the last pipeline stage)."""
    for history in history_per_rank:
        if history and history[0].get(key) is not None:
            return [record[key] for record in history]
    raise AssertionError(f"no rank logged {key}")
