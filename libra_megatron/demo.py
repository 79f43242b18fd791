"""``make demo``: the whole Libra pipeline on a small bundled default, on CPU, in a few minutes.

1. a learnable image-caption corpus (coloured shapes at named places, ``examples/demo_corpus.py``);
2. a tiny LLaMA-style sentencepiece tokenizer and the tiny random image tokenizer (CLIP + LFQ geometry of the real
   one);
3. a tiny *base* language model (a Hugging Face ``LlamaForCausalLM`` trained on the captions: the stand-in for
   LLaMA-2), converted to an engine checkpoint at TP=2 with ``tools/convert_checkpoint.py hf-llama-to-engine``
   (vision parameters initialised as the reference does);
4. ``tools/preprocess_images.py``: images and captions -> indexed binaries (LFQ codes, pixels, text ids);
5. Libra pretraining with ``pretrain_libra.py`` on 2 processes (TP=2; the LLM frozen, the vision parameters train,
   the frozen CLIP on the first stage), stopped half way (``--exit-interval``) and resumed from its checkpoint;
6. ``tools/convert_checkpoint.py engine-to-hf`` and captions of held-out images with ``tools/evaluate.py --task
   caption`` (the exported Hugging Face model, greedy decoding), which also reports their CIDEr and BLEU-4 through
   pycocoevalcap's scorers.

Everything lands in ``--output`` (default ``demo_out/``); ``--steps``/``--train-images`` scale it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _run(command: List[str], quiet: bool = False) -> str:
    """Run a tool as a user would (printed first); its output streams unless ``quiet``; fail loudly."""
    print("$ " + " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in command), flush=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    done = subprocess.run(command, cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    if done.returncode != 0:
        if quiet:
            print(done.stdout[-4000:])
        raise SystemExit(f"demo: step failed ({done.returncode}): {' '.join(command)}")
    return done.stdout or ""


def make_tokenizers(out: str) -> Dict[str, str]:
    """The sentencepiece model (512 ids, the tiny preset's text vocab) and the tiny image tokenizer folder."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    from libra_megatron.data.sentencepiece_training import default_sentences, train_sentencepiece
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    from demo_corpus import all_captions

    text_dir = os.path.join(out, "text_tokenizer")
    model = train_sentencepiece(os.path.join(text_dir, "tokenizer.model"), vocab_size=512,
                                sentences=default_sentences(2000) + all_captions() * 20)
    vision_dir = os.path.join(out, "vision_tokenizer")
    ImageTokenizer.tiny(0).save_pretrained(vision_dir)
    return {"text_dir": text_dir, "text_model": model, "vision_dir": vision_dir}


def train_base_lm(out: str, text_model: str, steps: int = 300) -> str:
    """A tiny HF LLaMA with the tiny preset's shape, trained on ``<s> \\n caption`` at the positions the caption
    takes after an image (``<s>`` at 0, ``\\n`` at 579), so the frozen text path sees familiar positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(REPO, "examples"))
    from libra_megatron.config import PRESETS
    from libra_megatron.data.text_tokenizer import TextTokenizer

    from demo_corpus import all_captions

    preset = PRESETS["tiny"]
    tokenizer = TextTokenizer(text_model)
    rows = [[tokenizer.bos_id, tokenizer.newline_id] + tokenizer.encode_continuation(c) for c in all_captions()]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.where(ids == 0, torch.full_like(ids, -100), ids)
    image_positions = preset["image_resolution"] ** 2 + 2
    positions = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, width) + image_positions])
    positions = positions.expand_as(ids)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=preset["text_vocab_size"], hidden_size=preset["hidden_size"],
                         intermediate_size=preset["ffn_hidden_size"], num_hidden_layers=preset["num_layers"],
                         num_attention_heads=preset["num_attention_heads"],
                         num_key_value_heads=preset["num_attention_heads"], rms_norm_eps=preset["layernorm_epsilon"],
                         max_position_embeddings=preset["max_position_embeddings"], rope_theta=preset["rotary_base"],
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        loss = model(input_ids=ids, position_ids=positions, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"base LM step {step:4d}: caption loss {loss.item():.3f}", flush=True)
    folder = os.path.join(out, "base_lm_hf")
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(text_model, os.path.join(folder, "tokenizer.model"))
    return folder


def _loss_table(metrics_file: str, every: int) -> None:
    with open(metrics_file) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    print(f"{'step':>6} {'samples':>8} {'text loss':>10} {'image loss':>11} {'lr':>10}")
    for row in rows:
        if row["iteration"] % every == 0 or row["iteration"] == 1:
            print(f"{row['iteration']:>6} {row['consumed_samples']:>8} {row['text_loss']:>10.3f} "
                  f"{row['image_loss']:>11.3f} {row['lr']:>10.2e}")


def main(argv: List[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(description="libra-megatron end-to-end CPU demo")
    parser.add_argument("--output", default=os.path.join(REPO, "demo_out"))
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--heldout-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="pretraining iterations (half before the resume)")
    parser.add_argument("--global-batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    start = time.time()
    out = os.path.abspath(args.output)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    python = sys.executable

    _banner("1/6 corpus: coloured shapes at named places")
    sys.path.insert(0, os.path.join(REPO, "examples"))
    from demo_corpus import generate

    corpus = generate(os.path.join(out, "corpus"), args.train_images, args.heldout_images, seed=0)
    print(f"{args.train_images} training and {args.heldout_images} held-out images in {corpus['images']}")

    _banner("2/6 tokenizers: sentencepiece (512 ids) and the tiny image tokenizer")
    tokenizers = make_tokenizers(out)

    _banner("3/6 base language model (stand-in for LLaMA-2), converted to an engine checkpoint at TP=2")
    base_hf = train_base_lm(out, tokenizers["text_model"])
    base_engine = os.path.join(out, "base_engine")
    _run([python, os.path.join(REPO, "tools", "convert_checkpoint.py"), "hf-llama-to-engine", "--source", base_hf,
          "--output", base_engine, "--model", "tiny", "--target-tp", "2"], quiet=True)

    _banner("4/6 preprocessing: images + captions -> indexed binaries")
    data = os.path.join(out, "data", "shapes")
    _run([python, os.path.join(REPO, "tools", "preprocess_images.py"), "--input-format", "image-folder",
          "--input", corpus["train"], "--image-root", corpus["images"], "--output-prefix", data,
          "--tokenizer-model", tokenizers["text_model"], "--image-tokenizer", tokenizers["vision_dir"],
          "--workers", "2", "--no-progress"])

    _banner("5/6 Libra pretraining, 2 processes (TP=2): LLM frozen, vision expert + bridge + heads train")
    checkpoints, metrics = os.path.join(out, "checkpoints"), os.path.join(out, "metrics.jsonl")
    half = args.steps // 2
    from libra_megatron.training.distributed import free_port

    train = [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), os.path.join(REPO, "pretrain_libra.py"),
             "--model", "tiny", "--stage", "pretrain", "--seq-length", "600", "--tensor-model-parallel-size", "2",
             "--micro-batch-size", "4", "--global-batch-size", str(args.global_batch_size),
             "--train-iters", str(args.steps), "--lr", "1e-2", "--lr-warmup-fraction", "0.05", "--min-lr", "1e-3",
             # a caption is ~6 of the ~585 targets of a sample: weigh the image positions down so the shared
             # vision expert learns from the captions in a few minutes (Adam still trains the image heads fully)
             "--image-loss-weight", "0.001",
             "--data-path", data, "--image-tokenizer", tokenizers["vision_dir"], "--num-workers", "1",
             "--pretrained-checkpoint", base_engine, "--load", checkpoints, "--save", checkpoints,
             "--save-interval", str(max(1, half // 2)), "--keep-last-checkpoints", "2",
             "--log-interval", "20", "--metrics-file", metrics, "--tensorboard-dir", os.path.join(out, "tensorboard"),
             # zero-shot captioning of the held-out images by the engine model itself after the last step: its
             # CIDEr equals the exported model's below (same weights, same greedy tokens)
             "--eval-captioning", corpus["heldout"], "--eval-captioning-image-root", corpus["images"],
             "--eval-captioning-tokenizer", tokenizers["text_model"], "--eval-captioning-interval", str(args.steps),
             "--eval-captioning-samples", str(args.heldout_images), "--eval-captioning-max-new-tokens", "12"]
    _run(train + ["--exit-interval", str(half)])
    print(f"--- stopped at iteration {half}; starting the same command again resumes from {checkpoints}")
    _run(train)
    _loss_table(metrics, every=20)

    _banner("6/6 export to Hugging Face and caption held-out images")
    export = os.path.join(out, "libra_tiny_hf")
    _run([python, os.path.join(REPO, "tools", "convert_checkpoint.py"), "engine-to-hf", "--source", checkpoints,
          "--output", export, "--tokenizer-dir", tokenizers["text_dir"],
          "--vision-tokenizer-dir", tokenizers["vision_dir"], "--dtype", "fp32"], quiet=True)
    with open(corpus["heldout"]) as handle:
        heldout = [json.loads(line) for line in handle]
    evaluation = os.path.join(out, "eval_heldout")
    _run([python, os.path.join(REPO, "tools", "evaluate.py"), "--task", "caption", "--data", corpus["heldout"],
          "--image-root", corpus["images"], "--model", export, "--output", evaluation, "--max-new-tokens", "12",
          "--batch-size", "8", "--device", "cpu", "--caption-metrics", "cider,bleu", "--caption-tokenizer",
          "simple", "--no-progress"], quiet=True)
    with open(os.path.join(evaluation, "predictions.jsonl")) as handle:
        lines = [{"text": row.get("prediction", "")} for row in map(json.loads, handle)]
    with open(os.path.join(evaluation, "summary.json")) as handle:
        summary = json.load(handle)
    exact, words, total_words = 0, 0, 0
    print(f"{'image':<18} {'true caption':<31} generated")
    for row, result in zip(heldout, lines):
        truth = row["caption"].split()
        generated = (result.get("text") or result.get("output") or "").split()
        guess = generated[:len(truth)]
        if len(guess) == len(truth) and guess[-1] != truth[-1] and guess[-1].startswith(truth[-1]):
            guess[-1] = truth[-1]  # ran on into the next caption without a space ("topa blue ...")
        exact += int(guess == truth)
        words += sum(a == b for a, b in zip(guess, truth))
        total_words += len(truth)
        print(f"{row['image']:<18} {row['caption']:<31} {' '.join(guess)}{' ...' if len(generated) > len(guess) else ''}")
    print("(a Libra base model never learns to stop: pretraining has no EOS target, as in the reference; the "
          "output is read up to the true caption's length)")
    metrics = summary["metrics"]
    print(f"\nheld-out captions (tools/evaluate.py, pycocoevalcap scorers on the raw generations): CIDEr "
          f"{metrics['CIDEr']:.3f}, BLEU-4 {metrics['BLEU-4']:.3f} over {summary['scored']} images "
          f"({os.path.join(evaluation, 'summary.md')})")
    print(f"held-out captions: {exact}/{len(heldout)} exact, {words}/{total_words} words in place; "
          f"demo finished in {time.time() - start:.0f} s (outputs in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
