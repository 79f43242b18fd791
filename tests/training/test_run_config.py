"""The run configuration is one frozen object after validation: it reads like the parsed flags, and any attempt to
change it (attribute, list content, deletion) raises, for every flag including ones added later."""
from __future__ import annotations

import argparse
import copy
import json
import pickle

import pytest

from libra_megatron.training.arguments import build_parser, parse_args, validate_args
from libra_megatron.training.data_stream import dataset_files
from libra_megatron.training.families import get_family
from libra_megatron.training.run_config import FrozenConfigError, FrozenList, RunConfig

FLAGS = ["--model-family", "gpt", "--model", "gpt-tiny", "--seq-length", "16", "--mock-data", "--train-iters", "4",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr-warmup-fraction", "0.25", "--device", "cpu"]


def _validated(argv=FLAGS, world_size=2):
    args = parse_args(argv)
    return args, validate_args(args, world_size, get_family(args.model_family).shape(args), dataset_files)


def test_validated_config_is_frozen_and_reads_like_the_flags() -> None:
    parsed, config = _validated()
    assert isinstance(config, RunConfig) and isinstance(config, argparse.Namespace)
    assert (config.data_parallel_size, config.num_microbatches, config.lr_warmup_iters) == (2, 2, 1)
    assert getattr(config, "no_such_flag", "default") == "default"
    with pytest.raises(FrozenConfigError, match="frozen after validation: cannot set 'lr'"):
        config.lr = 1.0
    with pytest.raises(FrozenConfigError, match="cannot set 'brand_new'"):
        config.brand_new = 1
    with pytest.raises(FrozenConfigError, match="cannot delete 'lr'"):
        del config.lr
    with pytest.raises(FrozenConfigError):
        setattr(config, "seed", 7)
    assert config.lr == parsed.lr
    # the parsed namespace was not used as the working copy: validation's derived fields are only on the config
    assert not hasattr(parsed, "num_microbatches")


def test_every_flag_is_covered_including_lists_and_new_flags() -> None:
    parsed = parse_args(FLAGS)
    parsed.a_flag_added_later = ["x", ["y"]]  # a flag another module adds to the parser: nothing to register
    config = validate_args(parsed, 2, get_family("gpt").shape(parsed), dataset_files)
    for name in vars(build_parser().parse_args(FLAGS)):
        with pytest.raises(FrozenConfigError):
            setattr(config, name, None)
    assert config.a_flag_added_later == ["x", ["y"]]
    for mutate in (lambda v: v.append("z"), lambda v: v.__setitem__(0, "z"), lambda v: v.extend([1]),
                   lambda v: v.pop(), lambda v: v.clear(), lambda v: v[1].append("z"), lambda v: v.sort()):
        with pytest.raises(FrozenConfigError):
            mutate(config.a_flag_added_later)
    with pytest.raises(FrozenConfigError):
        config.a_flag_added_later += ["z"]
    assert config.a_flag_added_later == ["x", ["y"]]


def test_copies_pickles_and_json_keep_it_frozen_and_equal() -> None:
    _, config = _validated()
    for other in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert other == config and vars(other) == vars(config)
        with pytest.raises(FrozenConfigError):
            other.lr = 0.5
    restored = pickle.loads(pickle.dumps(FrozenList([1, [2]])))
    assert isinstance(restored, FrozenList) and restored == [1, [2]]
    assert json.loads(json.dumps(vars(config)))["lr"] == config.lr


def test_replace_makes_a_new_frozen_config_and_thawed_a_plain_copy() -> None:
    _, config = _validated()
    planned = config.replace(device="cpu", tensor_model_parallel_size=1)
    assert planned is not config and planned.tensor_model_parallel_size == 1 and config.device == "cpu"
    with pytest.raises(FrozenConfigError):
        planned.device = "cuda"
    plain = config.thawed()
    plain.lr = 5.0
    assert type(plain) is argparse.Namespace and config.lr != 5.0
