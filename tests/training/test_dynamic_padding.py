"""Dynamic padding cuts micro-batches to their content and gives the fixed-padding losses per real token.

The tiny Libra model trains 2 steps on mock samples (captions of 1-15 tokens after 580 image/prefix positions) with
``--seq-length 640``: dynamic padding makes 592/608-position micro-batches. Losses (total, text, image) and grad
norms must equal the fixed-length run's to 1e-5 at TP=1 and at PP=2 (where the stream pads each step to its
longest micro-batch and the schedule sends that shape).
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.training.helpers import losses, make_args

FLAGS = [
    "--model-family", "libra", "--model", "tiny", "--num-layers", "2", "--seq-length", "640",
    "--image-tokenizer", "tiny:0", "--lr", "2e-3", "--lr-warmup-iters", "0", "--train-iters", "2",
    "--micro-batch-size", "2", "--global-batch-size", "4",
]


def _tiny_vocab():
    from libra_megatron.training.families import get_family

    return get_family("libra").vocab(make_args(FLAGS, 1))


def test_collate_cuts_to_the_longest_sample_rounded_up() -> None:
    from libra_megatron.data.dataset import collate_batch
    from libra_megatron.training.mock_data import MockPretrainDataset
    from libra_megatron.training.padding import DynamicPaddingCollate, content_length, pad_batch

    vocab = _tiny_vocab()
    dataset = MockPretrainDataset(vocab, 640, seed=3)
    rows = [dataset[i] for i in range(4)]
    fixed = collate_batch(rows)
    longest = content_length(fixed, vocab)
    assert 581 <= longest <= 596 and longest < 640
    dynamic = DynamicPaddingCollate(vocab, multiple=16, max_length=640)(rows)
    length = dynamic["tokens"].shape[-1]
    assert length % 16 == 0 and longest <= length < longest + 16
    for key in ("tokens", "labels", "vision_indices", "position_ids"):
        assert torch.equal(dynamic[key], fixed[key][..., :length]), key
        assert dynamic[key].is_contiguous()
    assert torch.equal(dynamic["pixels"], fixed["pixels"])
    # what was cut is padding only, and pad_batch restores the fixed batch's padding values
    restored = pad_batch(dynamic, 640, vocab)
    for key in ("tokens", "labels", "vision_indices"):
        assert torch.equal(restored[key], fixed[key]), key
    assert DynamicPaddingCollate(vocab, multiple=64, max_length=600)(rows)["tokens"].shape[-1] == 600  # capped


def test_padding_multiple_includes_tp_under_sequence_parallel() -> None:
    from libra_megatron.training.padding import padded_length, padding_multiple

    assert padding_multiple(16, 2, sequence_parallel=True) == 16
    assert padding_multiple(16, 3, sequence_parallel=True) == 48
    assert padding_multiple(16, 3, sequence_parallel=False) == 16
    assert padded_length(589, 16, 700) == 592 and padded_length(690, 64, 700) == 700 and padded_length(0, 8, 9) == 8


def _train(flags: List[str], world_size: int) -> List[Dict]:
    from libra_megatron.training.loop import pretrain

    return pretrain(make_args(FLAGS + flags, world_size))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, List[List[Dict]]]:
    init = str(tmp_path_factory.mktemp("padding") / "init")
    run_on_ranks(_train, world_size=1, args=(["--train-iters", "0", "--save", init], 1))
    start = ["--pretrained-checkpoint", init]
    return {
        "fixed": run_on_ranks(_train, world_size=1, args=(start + ["--sequence-padding", "fixed"], 1)),
        "dynamic": run_on_ranks(_train, world_size=1, args=(start + ["--sequence-padding", "dynamic"], 1)),
        "pp2_dynamic": run_on_ranks(_train, world_size=2, pp=2, args=(
            start + ["--sequence-padding", "dynamic", "--pipeline-model-parallel-size", "2"], 2)),
    }


@pytest.mark.parametrize("layout", ["dynamic", "pp2_dynamic"])
def test_dynamic_padding_gives_the_fixed_padding_losses(runs: Dict, layout: str) -> None:
    for key in ("lm_loss", "text_loss", "image_loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(losses(runs[layout], key)), torch.tensor(losses(runs["fixed"], key)),
                                   rtol=1e-5, atol=0, msg=key)
    # the same real tokens were counted (padding excluded either way), in shorter micro-batches
    assert losses(runs[layout], "tokens") == losses(runs["fixed"], "tokens")
    assert losses(runs["fixed"], "seq_length") == [640, 640]
    assert all(length < 640 and length % 16 == 0 for length in losses(runs[layout], "seq_length"))
