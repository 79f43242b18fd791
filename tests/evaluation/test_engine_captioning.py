"""Zero-shot captioning inside the trainer (CPU, gloo): the engine's greedy tokens equal the HF export's greedy
tokens at TP=1, TP=2 and PP=2 (with the KV cache and without), and the training losses are bit-identical with
captioning on and off (PP=2)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.distributed import run_on_ranks

FLAGS = ["--model-family", "libra", "--model", "tiny", "--seq-length", "600", "--mock-data",
         "--image-tokenizer", "tiny:0", "--lr", "3e-3", "--lr-warmup-iters", "0", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--stage", "instruct", "--num-workers", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A sentencepiece model with the tiny preset's 512 text ids, 3 images + captions, and a checkpoint trained 2
    steps at TP=1 with captioning on (its history), plus the same run with captioning off."""
    from libra_megatron.data.sentencepiece_training import train_sentencepiece

    tmp = tmp_path_factory.mktemp("captioning")
    spm = train_sentencepiece(tmp / "tokenizer.model", vocab_size=512)
    rng = np.random.default_rng(0)
    rows = []
    for n in range(3):
        Image.fromarray(rng.integers(0, 255, (36 + 5 * n, 48, 3), dtype=np.uint8)).save(tmp / f"{n}.png")
        rows.append({"image": f"{n}.png", "caption": f"a noisy picture number {n}"})
    (tmp / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    captioning = ["--eval-captioning", str(tmp / "heldout.jsonl"), "--eval-captioning-tokenizer", str(spm),
                  "--eval-captioning-samples", "3", "--eval-captioning-max-new-tokens", "4"]
    return tmp, captioning


def _train(flags, world_size):
    from libra_megatron.training.loop import pretrain
    from tests.training.helpers import make_args

    return pretrain(make_args(FLAGS + flags, world_size))


def _engine_ids(flags, world_size):
    """Greedy ids of every image from a trainer built on the saved checkpoint (last stage answers); the KV-cache
    decode gives the same ids as rerunning the whole sequence every step."""
    from megatron.core import parallel_state as ps

    from libra_megatron.training.evaluation import inference_guard
    from libra_megatron.training.families import get_family
    from libra_megatron.training.loop import Trainer
    from tests.training.helpers import make_args

    trainer = Trainer(make_args(FLAGS + flags, world_size), get_family("libra"))
    with inference_guard(trainer.model):
        ids = trainer.captioner.generate(trainer.model)  # KV cache: prefill once, then one token per step
        reference = trainer.captioner.generate(trainer.model, kv_cache=False)  # every step reruns the prefix
    assert ids == reference, (ids, reference)
    result = trainer.captioner.run(trainer.model)
    trainer.logger.close()
    return (ids, result) if ps.is_pipeline_last_stage(ignore_virtual=True) else None


def _export(source, output):
    from libra_megatron.checkpoint.engine_checkpoint import export_to_hf

    return export_to_hf(source, output, dtype=torch.float32)


def _hf_greedy_ids(export, spm, images, max_new_tokens):
    from libra_megatron.data.text_tokenizer import TextTokenizer
    from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM
    from libra_megatron.inference import prepare_batch, vocab_of
    from libra_megatron.tokenizer.image_processing import load_image, preprocess_image
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    model = LibraForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer, vocab = TextTokenizer(spm), vocab_of(model.config)
    codes, features = ImageTokenizer.tiny(0).encode(torch.stack([preprocess_image(load_image(p)) for p in images]))
    batch = prepare_batch(tokenizer, vocab, [""] * len(images), codes, features, chat=False)
    with torch.no_grad():
        out = model.generate(batch.input_ids, vision_indices=batch.vision_indices,
                             attention_mask=batch.attention_mask, contiguous_signal=batch.contiguous_signal,
                             max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, :, batch.input_ids.shape[-1]:].tolist()
    return [row[: row.index(vocab.eos_id)] if vocab.eos_id in row else row for row in new]


def test_training_losses_are_bit_identical_with_captioning_on_and_off_pp2(setup):
    tmp, captioning = setup
    layout = ["--pipeline-model-parallel-size", "2", "--train-iters", "3"]
    off = run_on_ranks(_train, world_size=2, pp=2, args=(layout, 2))
    on = run_on_ranks(_train, world_size=2, pp=2, args=(layout + captioning + ["--eval-captioning-interval", "1",
                                                        "--metrics-file", str(tmp / "m.jsonl")], 2))
    key = lambda h: [(r["iteration"], r["lm_loss"], r["text_loss"], r["image_loss"], r["grad_norm"]) for r in h]  # noqa: E731
    assert key(off[1]) == key(on[1]) and len(off[1]) == 3
    scored = [r for r in on[1] if "captioning_cider" in r]
    assert [r["iteration"] for r in scored] == [1, 2, 3] and all(r["captioning_samples"] == 3 for r in scored)
    logged = [json.loads(line) for line in (tmp / "m.jsonl").read_text().splitlines()]
    assert [r["captioning_cider"] for r in logged] == [r["captioning_cider"] for r in scored]


def test_engine_greedy_tokens_equal_the_hf_export_at_tp1_tp2_pp2(setup):
    tmp, captioning = setup
    ckpt = str(tmp / "ckpt")
    run_on_ranks(_train, world_size=1, args=(["--train-iters", "2", "--save", ckpt], 1))
    export = str(tmp / "export")
    run_on_ranks(_export, world_size=1, args=(ckpt, export))
    images = [str(tmp / f"{n}.png") for n in range(3)]
    want = _hf_greedy_ids(export, captioning[3], images, max_new_tokens=4)
    assert all(len(row) >= 1 for row in want)
    load = ["--load", ckpt, "--train-iters", "2"] + captioning
    for world, layout in ((1, []), (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                          (2, ["--pipeline-model-parallel-size", "2"])):
        tp = 2 if "--tensor-model-parallel-size" in layout else 1
        pp = 2 if "--pipeline-model-parallel-size" in layout else 1
        results = [r for r in run_on_ranks(_engine_ids, world_size=world, tp=tp, pp=pp, args=(load + layout, world))
                   if r is not None]
        for ids, scores in results:
            assert ids == want, (layout, ids, want)
            assert scores["captioning_samples"] == 3 and scores["captioning_cider"] >= 0.0

    # tools/evaluate.py on the engine checkpoint itself (converted on the fly) gives the same greedy captions
    from libra_megatron.data.text_tokenizer import TextTokenizer
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer
    from tools.evaluate import main

    vision = str(tmp / "vision")
    ImageTokenizer.tiny(0).save_pretrained(vision)
    out = tmp / "evaluate"
    assert main(["--task", "caption", "--data", str(tmp / "heldout.jsonl"), "--model", ckpt, "--output", str(out),
                 "--tokenizer", captioning[3], "--vision-tokenizer", vision, "--max-new-tokens", "4", "--device", "cpu",
                 "--caption-metrics", "cider", "--caption-tokenizer", "simple", "--no-progress"]) == 0
    assert os.path.isfile(out / "hf_export" / "config.json")
    tokenizer = TextTokenizer(captioning[3])
    got = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert got == [tokenizer.decode(row).split("\n")[0].strip() for row in want]


def test_interleaved_pipeline_gives_the_single_stage_tokens(setup):
    """PP=2 x VPP=2 (4 layers, one per virtual stage) decodes the same greedy tokens as one stage."""
    tmp, captioning = setup
    ckpt = str(tmp / "ckpt4")
    four = ["--num-layers", "4"]
    run_on_ranks(_train, world_size=1, args=(four + ["--train-iters", "1", "--save", ckpt], 1))
    load = four + ["--load", ckpt, "--train-iters", "1"] + captioning
    single = [r for r in run_on_ranks(_engine_ids, world_size=1, args=(load, 1)) if r is not None]
    interleaved = [r for r in run_on_ranks(_engine_ids, world_size=2, pp=2, vpp=2, args=(
        load + ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"], 2))
        if r is not None]
    assert len(single) == len(interleaved) == 1 and single[0][0] == interleaved[0][0]
    assert all(len(row) >= 1 for row in single[0][0])


def test_a_split_without_caption_items_fails_at_construction(tmp_path):
    """``--eval-captioning-split test`` on a Karpathy file without test images: an error naming the file and the
    split when the captioner is built, not a missing CIDEr after the first training interval."""
    import argparse

    from libra_megatron.evaluation.engine_captioning import EngineCaptioner

    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [{"filename": "0.png", "split": "val", "sentences": [{"raw": "a dog"}]}]}))
    args = argparse.Namespace(eval_captioning=str(path), eval_captioning_image_root=None,
                              eval_captioning_split="test", eval_captioning_samples=4)
    with pytest.raises(ValueError, match=r"dataset_coco.json: no caption items in split 'test'"):
        EngineCaptioner(args, vocab=None, vision_encoder=None)
