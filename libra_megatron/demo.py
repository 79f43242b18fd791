"""`make demo`: the end-to-end CPU demo (grows with the project; today: environment and a 2-rank TP check).

Runs, on two gloo ranks, a tiny megatron-core GPT for a few steps at TP=2 and compares it with one
process, then prints what it did.
"""
from __future__ import annotations

import sys


def main() -> int:
    """Run the demo and return a process exit code."""
    import torch

    from libra_megatron.ops.extension import extension_status

    print(f"libra-megatron demo | torch {torch.__version__} | {extension_status()}")
    sys.path.insert(0, ".")
    from tests.distributed import run_on_ranks, shutdown_pools
    from tests.megatron_helpers import assemble
    from tests.utils.test_megatron_cpu_parity import _train_gpt

    try:
        (single,) = run_on_ranks(_train_gpt, world_size=1, args=(None, False))
        tp2 = run_on_ranks(_train_gpt, world_size=2, tp=2, args=(assemble([single["initial"]]), False))
    finally:
        shutdown_pools()
    print("tiny GPT, 3 Adam steps, 1 process :", ["%.6f" % x for x in single["losses"]])
    print("tiny GPT, 3 Adam steps, TP=2 gloo  :", ["%.6f" % x for x in tp2[0]["losses"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
