#!/usr/bin/env python
"""Train Libra on megatron-core (TP/PP/DP, distributed optimizer, dist checkpoints).

    torchrun --nproc_per_node 8 pretrain_libra.py --model libra-7b --bf16 --data-path data/laion ...

Flags follow Megatron-LM (``--help`` lists them; ``--config file.yaml`` supplies defaults); see
``examples/pretrain_libra_7b.sh`` for the reference recipe and ``libra_megatron/train.py`` for the entry logic.
"""
import sys

from libra_megatron.train import main

if __name__ == "__main__":
    sys.exit(main())
