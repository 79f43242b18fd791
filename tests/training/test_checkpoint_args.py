"""The flags stored in a checkpoint are plain values: dist_checkpointing maps list items in place, which the frozen
run configuration's lists refuse (a save with ``--data-path`` failed this way)."""
from __future__ import annotations


def test_args_summary_of_a_frozen_config_survives_dist_checkpointing_preprocessing():
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    from libra_megatron.training.checkpointing import _args_summary
    from libra_megatron.training.run_config import RunConfig

    summary = _args_summary(RunConfig(data_path=["0.7", "data/a", "0.3", "data/b"], seed=1, blend=[("x", 1)]))
    dict_list_map_inplace(lambda value: value, summary)
    assert summary["data_path"] == ["0.7", "data/a", "0.3", "data/b"] and type(summary["data_path"]) is list
    assert summary["seed"] == 1 and "blend" not in summary
