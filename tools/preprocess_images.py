#!/usr/bin/env python
"""Preprocess an image-text corpus into libra-megatron's indexed binaries (``PREFIX.bin/.idx`` + ``PREFIX.json``).

Examples::

    # LAION-style webdataset shards, one process, 8 decode workers, GPU tokenisation when present
    python tools/preprocess_images.py --input-format webdataset --input 'laion/{00000..00099}.tar' \\
        --output-prefix data/laion --tokenizer-model llama2/tokenizer.model --image-tokenizer libra-vision-tokenizer \\
        --workers 8

    # the same over 16 processes (e.g. 2 nodes x 8 GPUs), then join the parts once
    python tools/preprocess_images.py ... --rank $RANK --world-size 16
    python tools/preprocess_images.py ... --merge only

    # image folder + captions.jsonl / .csv, COCO-Karpathy json, LLaVA instruction json
    python tools/preprocess_images.py --input-format image-folder --input captions.jsonl --image-root images/ ...
    python tools/preprocess_images.py --input-format coco-karpathy --input coco_karpathy_train.json --image-root coco/ ...
    python tools/preprocess_images.py --input-format llava --input llava_v1_5_mix665k.json --image-root llava/ ...

A killed job, rerun with the same arguments, resumes and produces exactly the dataset an uninterrupted run
would have. Bad inputs are skipped and listed in ``PREFIX.rejects.jsonl`` with their source and reason; image
paths never leave ``--image-root``; a stuck or dying decode worker is replaced (``--worker-timeout``) and its
record retried. Exit status: 0 done (warnings name records a rerun will retry), 2 bad arguments/input or no
sample kept (no dataset is written). Failure classes: ``docs/design.md#preprocessing-failure-classes``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libra_megatron.data.pixel_codec import DEFAULT_PIXEL_FORMAT, PIXEL_FORMATS  # noqa: E402
from libra_megatron.data.preprocess_job import PreprocessConfig, format_summary, run_preprocessing, summary_json  # noqa: E402
from libra_megatron.data.preprocess_worker import DEFAULT_MAX_IMAGE_PIXELS  # noqa: E402
from libra_megatron.data.records import DEFAULT_MAX_IMAGE_BYTES  # noqa: E402
from libra_megatron.data.samples import DEFAULT_MAX_CAPTION_TOKENS  # noqa: E402


def _expand_braces(pattern: str) -> list[str]:
    """webdataset-style ``{00000..00099}`` ranges (zero padding kept)."""
    import re

    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first)
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [p for i in range(int(first), int(last) + 1) for p in _expand_braces(f"{head}{i:0{width}d}{tail}")]


def parse_args(argv: Optional[Sequence[str]] = None) -> PreprocessConfig:
    """Command-line flags -> :class:`PreprocessConfig`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io_group = parser.add_argument_group("input / output")
    io_group.add_argument("--input-format", required=True, choices=("webdataset", "image-folder", "coco-karpathy", "llava"))
    io_group.add_argument("--input", nargs="+", required=True,
                          help="tar shards (globs and {000..099} ranges) or one annotation file (.jsonl/.csv/.json)")
    io_group.add_argument("--image-root", default=None, help="folder that annotation image paths are relative to")
    io_group.add_argument("--output-prefix", required=True)
    io_group.add_argument("--image-key", default="image", help="image field of a captions jsonl/csv")
    io_group.add_argument("--caption-key", default="caption", help="caption field of a captions jsonl/csv")
    tok = parser.add_argument_group("tokenizers")
    tok.add_argument("--tokenizer-model", required=True, help="sentencepiece model (LLaMA-2 tokenizer.model)")
    tok.add_argument("--image-tokenizer", default=None,
                     help="image tokenizer folder (ImageTokenizer.save_pretrained, or the released yaml + vqgan.ckpt)")
    tok.add_argument("--clip-model", default=None, help="CLIP ViT-L/14-336 folder for a released image tokenizer")
    tok.add_argument("--tiny-image-tokenizer", type=int, default=None, metavar="SEED",
                     help="use ImageTokenizer.tiny(SEED) (tests and the CPU demo)")
    tok.add_argument("--device", default="auto", help="image tokenisation device (auto: cuda when available)")
    tok.add_argument("--tokenizer-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    tok.add_argument("--batch-size", type=int, default=32, help="images per image-tokenizer call")
    run = parser.add_argument_group("scale / robustness")
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode processes (0 = inline)")
    run.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    run.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    run.add_argument("--merge", default="auto", choices=("auto", "only", "never"),
                     help="auto: merge when --world-size is 1; only: join finished parts; never: parts only")
    run.add_argument("--chunk-size", type=int, default=1000, help="annotation records per chunk (a tar shard is one chunk)")
    run.add_argument("--pixel-format", default=DEFAULT_PIXEL_FORMAT, choices=PIXEL_FORMATS)
    run.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                     help="reject images above this many pixels (decompression bombs)")
    run.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                     help="reject image files / tar members above this size without reading them (default 64 MB)")
    run.add_argument("--max-caption-words", type=int, default=64)
    run.add_argument("--max-caption-tokens", type=int, default=DEFAULT_MAX_CAPTION_TOKENS,
                     help="keep at most this many caption tokens (a caption without spaces is one word)")
    run.add_argument("--worker-timeout", type=float, default=600.0,
                     help="seconds one record may take in a decode worker; a stuck worker is replaced and the "
                          "record retried once, then rejected as 'timeout' (retried by the next run)")
    run.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    inputs = [p for pattern in args.input for p in _expand_braces(pattern)]
    return PreprocessConfig(
        input_format=args.input_format, inputs=inputs, output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model, image_tokenizer=args.image_tokenizer, clip_model=args.clip_model,
        tiny_image_tokenizer_seed=args.tiny_image_tokenizer, image_root=args.image_root, chunk_size=args.chunk_size,
        workers=args.workers, batch_size=args.batch_size, device=args.device, tokenizer_dtype=args.tokenizer_dtype,
        rank=args.rank, world_size=args.world_size, merge=args.merge, pixel_format=args.pixel_format,
        max_image_pixels=args.max_image_pixels, max_caption_words=args.max_caption_words, image_key=args.image_key,
        caption_key=args.caption_key, progress=not args.no_progress, max_image_bytes=args.max_image_bytes,
        max_caption_tokens=args.max_caption_tokens, worker_timeout_s=args.worker_timeout,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the job; exit status 0 when done, 2 for bad arguments/input or when no sample is kept."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        summary = run_preprocessing(config)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"preprocess_images: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary), file=sys.stderr)
    print(summary_json(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
