"""The trainer on binaries written by tools/preprocess_images.py: it trains on them (losses fall, samples counted),
and refuses an image tokenizer other than the one that wrote the data's codes."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List

import pytest

from tests.distributed import RankFailure, run_on_ranks
from tests.training.helpers import make_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Dict[str, str]:
    sys.path.insert(0, os.path.join(REPO, "examples"))
    from libra_megatron.data.preprocess_job import PreprocessConfig, run_preprocessing
    from libra_megatron.data.sentencepiece_training import default_sentences, train_sentencepiece
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    from demo_corpus import all_captions, generate

    root = tmp_path_factory.mktemp("real_data")
    paths = generate(str(root / "corpus"), train=12, heldout=0, seed=3)
    text = train_sentencepiece(str(root / "tokenizer.model"), vocab_size=512,
                               sentences=default_sentences(2000) + all_captions() * 5)
    for seed in (0, 1):
        ImageTokenizer.tiny(seed).save_pretrained(str(root / f"vision{seed}"))
    prefix = str(root / "data" / "shapes")
    run_preprocessing(PreprocessConfig(input_format="image-folder", inputs=[paths["train"]], output_prefix=prefix,
                                       tokenizer_model=text, image_tokenizer=str(root / "vision0"),
                                       image_root=paths["images"], progress=False))
    return {"prefix": prefix, "vision0": str(root / "vision0"), "vision1": str(root / "vision1")}


def _train(flags: List[str]) -> List[Dict]:
    from libra_megatron.training.loop import pretrain

    base = ["--model-family", "libra", "--model", "tiny", "--seq-length", "600", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3"]
    return pretrain(make_args(base + flags, 1, mock_data=False))


def test_trains_on_preprocessed_binaries(corpus) -> None:
    (history,) = run_on_ranks(_train, world_size=1, args=(["--data-path", corpus["prefix"],
                                                             "--image-tokenizer", corpus["vision0"]],))
    assert [r["consumed_samples"] for r in history] == [4, 8, 12]
    assert history[-1]["image_loss"] < history[0]["image_loss"]
    assert all(r["text_loss"] > 0 for r in history)
    with open(corpus["prefix"] + ".json") as handle:
        assert json.load(handle)["counts"]["samples"] == 12


def test_validates_on_preprocessed_binaries(corpus) -> None:
    (history,) = run_on_ranks(_train, world_size=1, args=(["--data-path", corpus["prefix"], "--image-tokenizer",
                                                             corpus["vision0"], "--valid-data-path", corpus["prefix"],
                                                             "--eval-interval", "2", "--eval-iters", "1"],))
    assert [r["consumed_samples"] for r in history] == [4, 8, 12]
    validated = [r["iteration"] for r in history if "validation_lm_loss" in r]
    assert validated == [2, 3]
    assert all(r["validation_text_loss"] > 0 and r["validation_image_loss"] > 0 for r in history[1:])


def test_refuses_a_different_image_tokenizer(corpus) -> None:
    with pytest.raises(RankFailure, match=r"is not the tokenizer that preprocessed .*shapes"):
        run_on_ranks(_train, world_size=1, args=(["--data-path", corpus["prefix"],
                                                  "--image-tokenizer", corpus["vision1"]],))
