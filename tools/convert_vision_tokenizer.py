#!/usr/bin/env python
"""Convert the released Libra vision tokenizer to libra-megatron's safetensors format.

    # a released model folder (vision_tokenizer_config.yaml + vqgan.ckpt [+ openai-clip-vit-large-patch14-336/])
    python tools/convert_vision_tokenizer.py --released libra-11b-chat --out libra-vision-tokenizer
    python tools/convert_vision_tokenizer.py --released libra-11b-chat --clip-dir clip-vit-large-patch14-336 \\
        --out libra-vision-tokenizer --dtype bf16 --check-image duck.jpg

    # the tiny random tokenizer of the tests and the CPU demo
    python tools/convert_vision_tokenizer.py --tiny 0 --out demo_out/tiny-vision-tokenizer

``vqgan.ckpt`` is read with ``torch.load(weights_only=True)`` only (a pickle that needs more is refused, with the
one-line extraction to run where you trust the file). The output folder gets ``vision_tokenizer.safetensors`` and
``vision_tokenizer_config.json`` (load with ``ImageTokenizer.from_pretrained``); CLIP blocks 23-24 and the GAN/LPIPS
``loss.*`` weights are not carried over (never used). Prints one JSON line describing the result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--released", help="folder with vision_tokenizer_config.yaml and vqgan.ckpt")
    source.add_argument("--tiny", type=int, metavar="SEED", help="write ImageTokenizer.tiny(SEED) instead")
    parser.add_argument("--clip-dir", default=None, help="local CLIP folder for the vision config (default: in --released)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights dtype to store (default fp32)")
    parser.add_argument("--check-image", default=None, help="encode this image before and after saving; ids must match")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from libra_megatron.tokenizer.image_processing import load_image, preprocess_image
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    start = time.time()
    if args.tiny is not None:
        model = ImageTokenizer.tiny(args.tiny)
    else:
        model = ImageTokenizer.from_released(args.released, clip_folder=args.clip_dir)
    model = model.to(DTYPES[args.dtype])
    model.save_pretrained(args.out)
    report = {
        "out": os.path.abspath(args.out),
        "source": f"tiny:{args.tiny}" if args.tiny is not None else os.path.abspath(args.released),
        "dtype": args.dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "clip_blocks": len(model.encoder.vision_tower.encoder.layers),
        "feature_size": model.feature_size,
        "seconds": round(time.time() - start, 1),
    }
    if args.check_image:
        pixels = preprocess_image(load_image(args.check_image))[None]
        before = model.encode(pixels)[0]
        after = ImageTokenizer.from_pretrained(args.out, dtype=DTYPES[args.dtype]).encode(pixels)[0]
        if not torch.equal(before, after):
            raise SystemExit(f"{args.out}: ids of {args.check_image} changed after saving")
        report["check_image_ids_equal"] = True
    print(json.dumps(report))


if __name__ == "__main__":
    main()
