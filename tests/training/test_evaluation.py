"""Periodic validation (``--eval-interval`` / ``--eval-iters``): right numbers, layout-invariant, and harmless.

All runs start from one TP=1 checkpoint of the tiny Libra model and use ``--mock-data`` (its own validation
stream), fp32:

* the validation losses the trainer reports equal a direct training-mode forward of the model over the same
  validation samples (token-weighted lm / text / image loss), and a second evaluation right after gives the same
  values (the validation stream restarts at sample 0 and is deterministic);
* PP=2 (forward-only 1F1B) and DP=2 (distributed optimizer, overlapped grad reduce and param gather, samples split
  over DP) report the TP=1 validation losses (<= 1e-5);
* a run with evaluation enabled trains exactly like one without (same losses, grad norms, consumed samples, bit
  for bit), at TP=1 and at DP=2 with overlapped param gather (the forward pre-hooks are toggled around eval);
* ``--train-iters 0 --eval-iters K`` evaluates the starting weights;
* bad evaluation flags are refused at start.
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

from libra_megatron.training.arguments import ConfigError, parse_args, validate_args
from libra_megatron.training.data_stream import dataset_files
from libra_megatron.training.families import get_family
from tests.distributed import run_on_ranks
from tests.training.helpers import make_args

FLAGS = [
    "--model-family", "libra", "--model", "tiny", "--num-layers", "4", "--seq-length", "600",
    "--image-tokenizer", "tiny:0", "--lr", "2e-3", "--lr-decay-iters", "8", "--lr-warmup-iters", "1",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
]
EVAL = ["--eval-interval", "2", "--eval-iters", "2"]
VALID_KEYS = ("validation_lm_loss", "validation_text_loss", "validation_image_loss")
TRAIN_KEYS = ("iteration", "consumed_samples", "lm_loss", "text_loss", "image_loss", "grad_norm", "lr")


def _direct_validation(trainer) -> Dict[str, float]:
    """Token-weighted losses of a plain training-mode forward over the validation samples (no schedule)."""
    from libra_megatron.data.dataset import collate_batch
    from libra_megatron.training.data_stream import build_valid_dataset
    from libra_megatron.training.evaluation import validation_fields
    from libra_megatron.training.model_family import LOSS_KEYS

    args = trainer.args
    dataset, samples = build_valid_dataset(args, trainer.vocab)
    model = trainer.model[0]
    assert model.training
    totals = torch.zeros(len(LOSS_KEYS), 2, dtype=torch.float64)
    for start in range(0, samples, args.micro_batch_size):
        batch = collate_batch([dataset[i] for i in range(start, start + args.micro_batch_size)])
        output = trainer.family.run_model(model, batch, trainer.vision_encoder(batch["pixels"]))
        _, _, report = trainer.family.reduce_loss(output, batch, trainer.vocab)
        totals += torch.stack([report[key].detach().double() for key in LOSS_KEYS])
    return validation_fields({key: float(totals[i, 0] / totals[i, 1]) for i, key in enumerate(LOSS_KEYS)})


def _train(flags: List[str], world_size: int, check_direct: bool = False) -> Dict:
    from libra_megatron.training.loop import Trainer

    args = make_args(FLAGS + flags, world_size)
    trainer = Trainer(args, get_family("libra"))
    out: Dict = {"history": trainer.train()}
    if check_direct:
        rng = torch.get_rng_state()
        out["again"] = trainer.evaluate()
        out["rng_untouched"] = torch.equal(rng, torch.get_rng_state())
        out["direct"] = _direct_validation(trainer)
    return out


def _logged(per_rank: List[Dict], key: str) -> List[Dict]:
    for result in per_rank:
        if result["history"] and key in result["history"][-1]:
            return result["history"]
    raise AssertionError(f"no rank logged {key}")


def _validation(per_rank: List[Dict]) -> Dict[int, List[float]]:
    return {r["iteration"]: [r[key] for key in VALID_KEYS] for r in _logged(per_rank, VALID_KEYS[0])
            if VALID_KEYS[0] in r}


def _training(per_rank: List[Dict]) -> List[List[float]]:
    return [[r[key] for key in TRAIN_KEYS] for r in _logged(per_rank, "lm_loss")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, List[Dict]]:
    init = str(tmp_path_factory.mktemp("evaluation") / "init")
    out = {"init": run_on_ranks(_train, world_size=1, args=(
        ["--train-iters", "0", "--eval-iters", "2", "--save", init], 1))}
    start = ["--pretrained-checkpoint", init]
    out["tp1_eval"] = run_on_ranks(_train, world_size=1, args=(start + EVAL, 1, True))
    out["tp1"] = run_on_ranks(_train, world_size=1, args=(start, 1))
    out["pp2_eval"] = run_on_ranks(_train, world_size=2, pp=2, args=(
        start + EVAL + ["--pipeline-model-parallel-size", "2"], 2))
    dp2 = start + ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    out["dp2_eval"] = run_on_ranks(_train, world_size=2, args=(dp2 + EVAL, 2))
    out["dp2"] = run_on_ranks(_train, world_size=2, args=(dp2, 2))
    return out


def test_reported_validation_equals_a_direct_forward_and_repeats(runs) -> None:
    (result,) = runs["tp1_eval"]
    validation = _validation(runs["tp1_eval"])
    assert sorted(validation) == [2, 3], "evaluate every --eval-interval and at the end of training"
    final = dict(zip(VALID_KEYS, validation[3]))
    for key in VALID_KEYS:
        assert final[key] == pytest.approx(result["direct"][key], rel=1e-6, abs=0)
    assert {"validation_" + k.replace(" ", "_"): v for k, v in result["again"].items()} == final
    assert validation[2] != validation[3], "the weights changed between the evaluations"
    assert result["rng_untouched"], "evaluation changed the global torch RNG state"


def test_train_iters_zero_evaluates_the_starting_weights(runs) -> None:
    (history,) = [result["history"] for result in runs["init"]]
    assert [record["iteration"] for record in history] == [0]
    start = [history[0][key] for key in VALID_KEYS]
    assert all(5.0 < value < 8.0 for value in start), start  # ~ln(vocab) for an untrained model
    assert _validation(runs["tp1_eval"])[3][0] < start[0], "two training steps lower the held-out loss"


@pytest.mark.parametrize("layout", ["pp2_eval", "dp2_eval"])
def test_validation_is_layout_invariant(runs, layout: str) -> None:
    reference, other = _validation(runs["tp1_eval"]), _validation(runs[layout])
    assert sorted(other) == sorted(reference)
    for iteration in reference:
        torch.testing.assert_close(torch.tensor(other[iteration]), torch.tensor(reference[iteration]),
                                   rtol=1e-5, atol=0)


@pytest.mark.parametrize("with_eval, without", [("tp1_eval", "tp1"), ("dp2_eval", "dp2")])
def test_evaluation_does_not_perturb_training(runs, with_eval: str, without: str) -> None:
    assert _training(runs[with_eval]) == _training(runs[without])
    assert [r["consumed_samples"] for r in _logged(runs[with_eval], "lm_loss")] == [8, 16, 24]


def _validate(argv: List[str]):
    args = parse_args(["--model", "tiny", "--image-tokenizer", "tiny", "--train-iters", "4"] + argv)
    return validate_args(args, 1, get_family(args.model_family).shape(args), dataset_files)


@pytest.mark.parametrize("argv, message", [
    (["--mock-data", "--eval-interval", "2"], r"--eval-interval 2 needs --eval-iters > 0"),
    (["--mock-data", "--eval-interval", "0", "--eval-iters", "1"], r"--eval-interval must be > 0"),
    (["--mock-data", "--eval-iters", "-1"], r"--eval-iters must be >= 0"),
    (["--mock-data", "--valid-data-path", "val"], r"--valid-data-path cannot be combined with --mock-data"),
])
def test_bad_evaluation_flags_are_refused(argv: List[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _validate(argv)


def test_evaluation_needs_a_validation_set(tmp_path) -> None:
    for suffix in (".bin", ".idx", ".json"):
        (tmp_path / ("train" + suffix)).write_bytes(b"")
    train = ["--data-path", str(tmp_path / "train")]
    with pytest.raises(ConfigError, match=r"--eval-iters 10 needs a validation set: --valid-data-path"):
        _validate(train + ["--eval-interval", "200", "--eval-iters", "10"])
    (tmp_path / "val.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"--valid-data-path: file not found: .*val.idx \(from prefix"):
        _validate(train + ["--valid-data-path", "2", str(tmp_path / "train"), "1", str(tmp_path / "val"),
                           "--eval-iters", "1"])
    args = _validate(train + ["--valid-data-path", str(tmp_path / "train"), "--eval-iters", "1"])
    assert args.valid_blend == [(1.0, str(tmp_path / "train"))] and args.eval_interval is None
