#!/usr/bin/env python
"""Evaluation throughput (images/s) of ``tools/evaluate.py --task caption``'s generation loop: image files ->
preprocessing -> image tokenizer (CLIP + LFQ) -> batched greedy ``generate`` of the HF Libra model -> captions.

    python bench/eval_throughput.py --device cuda --batch-size 16 --images 128     # the 11B model, bf16, H100/H200
    python bench/eval_throughput.py --device cpu --config tiny --images 8           # smoke run on CPU

The model is ``LibraForCausalLM`` with the released 11B config (``--config 11b``) and random weights built on the
device (an 11B export would be 22 GB to write and read; load time is not part of the throughput), the image tokenizer
has the real ViT-L/14-336 geometry (``random:0``). The text tokenizer is a stand-in with the model's vocabulary size
(``<s>``, ``\\n`` and ``</s>`` ids of LLaMA-2): the prompt is the raw captioning prompt ``<s> image \\n``; random
weights rarely emit ``</s>``, so every caption runs to ``--max-new-tokens`` (the worst case). The timed loop is
``runner.Generator.answer`` (the same call ``tools/evaluate.py`` makes per batch), after one warm-up batch.
Prints one JSON line (and appends it to ``--output`` when given).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StandInTokenizer:
    """Text-tokenizer interface for the benchmark: fixed prompt ids, captions decoded as id lists."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.bos_id, self.eos_id, self.newline_id = vocab_size, 1, 2, 13

    def encode(self, text: str):
        return [29871] if self.vocab_size > 29871 else [3]

    def encode_continuation(self, text: str):
        return [self.newline_id] + ([29871] if text.strip() and self.vocab_size > 29871 else [])

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=["11b", "tiny"], default="11b")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=128, help="timed images (after one warm-up batch)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on cuda")
    parser.add_argument("--output", default=None, help="append the JSON result here")
    args = parser.parse_args(argv)
    from libra_megatron.evaluation.runner import EvalOptions, Generator
    from libra_megatron.evaluation.tasks import EvalItem
    from libra_megatron.hf_modeling.configuration_libra import LibraConfig
    from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM
    from libra_megatron.training.vision import load_image_tokenizer

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    torch.manual_seed(0)
    if args.config == "11b":
        config, vision_spec = LibraConfig(), "random:0"
    else:
        config = LibraConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, contiguous_signal_size=128)
        vision_spec = "tiny:0"
    started = time.perf_counter()
    with torch.device(args.device):
        model = LibraForCausalLM(config).to(dtype).eval()
    image_tokenizer = load_image_tokenizer(vision_spec).to(args.device)
    build_s = time.perf_counter() - started
    options = EvalOptions(task="caption", data="", model="", output="", batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, template="raw")
    generator = Generator(options, model, StandInTokenizer(config.vocab_size), image_tokenizer, args.device, dtype)
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        items = []
        for n in range(args.images + args.batch_size):
            path = os.path.join(folder, f"{n}.jpg")
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
            items.append(EvalItem(str(n), path, "", ["x"]))
        generator.answer(items[: args.batch_size])  # warm-up (kernels, allocator)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        tokens = 0
        for start in range(args.batch_size, len(items), args.batch_size):
            records = generator.answer(items[start: start + args.batch_size])
            tokens += sum(r.get("new_tokens", 0) for r in records)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    result = {"bench": "eval_throughput", "config": args.config, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "dtype": str(dtype).replace("torch.", ""), "batch_size": args.batch_size, "images": args.images,
              "max_new_tokens": args.max_new_tokens, "images_per_s": round(args.images / seconds, 3),
              "new_tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 3),
              "build_s": round(build_s, 1), "params": sum(p.numel() for p in model.parameters()),
              "max_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
              if args.device.startswith("cuda") else None, "torch": torch.__version__}
    line = json.dumps(result)
    print(line, flush=True)
    if args.output:
        with open(args.output, "a") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
