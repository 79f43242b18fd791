"""The training loop gives the single-process loss sequence under every parallel layout, and checkpoints reshard.

All runs start from one TP=1 checkpoint of the tiny Libra model (``--pretrained-checkpoint``, as a real run starts
from converted LLaMA weights), train on the same mock samples in fp32, and must agree to 1e-5:

* 5 steps at TP=2, PP=2 (4 micro-batches of 2 > 2 stages, 1F1B), PP=2 x VPP=2 (interleaved) and DP=2 with the
  distributed optimizer (with overlapped grad reduce and param gather) equal TP=1 step for step (losses and
  grad norms);
* the TP=2 run saves at step 5 and goes on to step 7; loading that step-5 checkpoint at TP=1 and at PP=2 and
  training two more steps gives the TP=2 run's losses on the same batches (model, optimizer and schedule reshard).
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.training.helpers import losses, make_args

FLAGS = [
    "--model-family", "libra", "--model", "tiny", "--num-layers", "4", "--seq-length", "600",
    "--image-tokenizer", "tiny:0", "--lr", "2e-3", "--lr-decay-iters", "8", "--lr-warmup-iters", "1",
    "--micro-batch-size", "2", "--global-batch-size", "8",
]


def _train(flags: List[str], world_size: int) -> List[Dict]:
    from libra_megatron.training.loop import pretrain

    return pretrain(make_args(FLAGS + flags, world_size))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, List[List[Dict]]]:
    root = tmp_path_factory.mktemp("parity")
    init = str(root / "init")
    run_on_ranks(_train, world_size=1, args=(["--train-iters", "0", "--save", init], 1))
    start = ["--pretrained-checkpoint", init]
    out = {"tp1": run_on_ranks(_train, world_size=1, args=(start + ["--train-iters", "5"], 1))}
    out["tp2"] = run_on_ranks(_train, world_size=2, tp=2, args=(
        start + ["--train-iters", "7", "--tensor-model-parallel-size", "2", "--save", str(root / "tp2"),
                 "--save-interval", "5"], 2))
    out["pp2"] = run_on_ranks(_train, world_size=2, pp=2, args=(
        start + ["--train-iters", "5", "--pipeline-model-parallel-size", "2"], 2))
    out["pp2_vpp2"] = run_on_ranks(_train, world_size=2, pp=2, vpp=2, args=(
        start + ["--train-iters", "5", "--pipeline-model-parallel-size", "2",
                 "--virtual-pipeline-model-parallel-size", "2"], 2))
    out["dp2_distopt"] = run_on_ranks(_train, world_size=2, args=(  # the 7B recipe's DP flags
        start + ["--train-iters", "5", "--use-distributed-optimizer", "--overlap-grad-reduce",
                 "--overlap-param-gather"], 2))
    resume = ["--load", str(root / "tp2"), "--ckpt-step", "5", "--train-iters", "7"]
    out["tp2_to_tp1"] = run_on_ranks(_train, world_size=1, args=(resume, 1))
    out["tp2_to_pp2"] = run_on_ranks(_train, world_size=2, pp=2, args=(
        resume + ["--pipeline-model-parallel-size", "2"], 2))
    return out


@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_vpp2", "dp2_distopt"])
def test_five_steps_match_single_process(runs: Dict, layout: str) -> None:
    reference = losses(runs["tp1"], "lm_loss")
    assert len(reference) == 5 and reference[-1] < reference[0], f"training did not lower the loss: {reference}"
    torch.testing.assert_close(torch.tensor(losses(runs[layout], "lm_loss")[:5]), torch.tensor(reference),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(losses(runs[layout], "grad_norm")[:5]),
                               torch.tensor(losses(runs["tp1"], "grad_norm")), rtol=1e-5, atol=0)
    for key in ("text_loss", "image_loss"):
        torch.testing.assert_close(torch.tensor(losses(runs[layout], key)[:5]),
                                   torch.tensor(losses(runs["tp1"], key)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["tp2_to_tp1", "tp2_to_pp2"])
def test_checkpoint_saved_at_tp2_resumes_under_another_layout(runs: Dict, layout: str) -> None:
    continued = losses(runs["tp2"], "lm_loss")[5:]
    resumed = losses(runs[layout], "lm_loss")
    assert len(resumed) == 2, f"expected steps 6 and 7 only, got {resumed}"
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(continued), rtol=1e-5, atol=0)
    consumed = [record["consumed_samples"] for record in runs[layout][-1]]
    assert consumed == [48, 56]
