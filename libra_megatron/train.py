"""Entry point: ``torchrun ... -m libra_megatron.train <flags>`` (or ``pretrain_libra.py`` at the repo root).

Flags are validated in every process before any process group is created, so a bad configuration stops all ranks
at once with one clear message (printed by rank 0) and exit code 2.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from libra_megatron.utils.megatron_compat import silence_fallback_notices

# megatron-core announces its fallbacks at import time on every rank; one line in the docs says it instead.
silence_fallback_notices()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, validate, then dry-run or train. Returns the process exit code."""
    from libra_megatron.training.arguments import ConfigError, parse_args, validate_args
    from libra_megatron.training.data_stream import dataset_files
    from libra_megatron.training.distributed import world_from_env
    from libra_megatron.training.families import get_family

    rank, world_size, _ = world_from_env()
    try:
        args = parse_args(argv)
        family = get_family(args.model_family)
        if args.dry_run:
            world_size = args.dry_run_world_size or world_size
        args = validate_args(args, world_size, family.shape(args), dataset_files)
    except (ConfigError, ValueError) as error:
        if rank == 0:
            print(f"pretrain_libra: configuration error: {error}", file=sys.stderr, flush=True)
        return 2
    if args.dry_run:
        from libra_megatron.training.dry_run import dry_run

        dry_run(args, family)
        return 0

    from libra_megatron.training.loop import NonFiniteLossError, pretrain

    try:
        pretrain(args, family)
    except NonFiniteLossError as error:
        print(f"pretrain_libra: {error}", file=sys.stderr, flush=True)
        return 3
    finally:
        _shutdown()
    return 0


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
