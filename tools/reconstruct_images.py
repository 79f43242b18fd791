#!/usr/bin/env python
"""Show what the image tokenizer keeps: encode images to LFQ ids, decode them, write original | reconstruction PNGs.

    python tools/reconstruct_images.py photos/ --tokenizer libra-vision-tokenizer --out recon.png --device cuda
    python tools/reconstruct_images.py a.jpg b.png --released libra-11b-chat --out recon/ --per-image
    python tools/reconstruct_images.py a.jpg --tiny 0 --out demo_out/recon.png          # random weights (CPU demo)

Inputs are image files or folders (searched for common image extensions, sorted). Each image goes through the
training preprocessing (pad to square with the CLIP mean colour, 336x336), then ``ImageTokenizer.encode`` and
``decode``. The output is one grid PNG (a row per image: model input | reconstruction) or, with ``--per-image``,
one PNG per image in the ``--out`` folder. Unreadable images are skipped and reported. One JSON line per image
(``psnr_db`` of the reconstruction against the 336x336 input, ids used per codebook) and a summary line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
logger = logging.getLogger("reconstruct_images")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="folder written by ImageTokenizer.save_pretrained")
    source.add_argument("--released", help="released folder (vision_tokenizer_config.yaml + vqgan.ckpt)")
    source.add_argument("--tiny", type=int, metavar="SEED", help="ImageTokenizer.tiny(SEED) (random weights)")
    parser.add_argument("--clip-dir", default=None, help="CLIP folder for --released (config only)")
    parser.add_argument("--out", required=True, help="grid PNG path, or a folder with --per-image")
    parser.add_argument("--per-image", action="store_true", help="one original|reconstruction PNG per image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-images", type=int, default=64, help="at most this many images (a grid stays viewable)")
    return parser.parse_args(argv)


def find_images(inputs: List[str]) -> List[str]:
    """Expand folders into their image files (sorted); files are kept as given."""
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, files in sorted(os.walk(item)):
                paths += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise SystemExit(f"input {item!r} does not exist")
    return paths


def side_by_side(original: np.ndarray, reconstruction: np.ndarray, gap: int = 4) -> np.ndarray:
    """Two HWC uint8 images with a white gap between them."""
    spacer = np.full((original.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([original, spacer, reconstruction], axis=1)


def save_png(array: np.ndarray, path: str) -> None:
    """Write a PNG atomically (temporary file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def load_tokenizer(args):
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    if args.tiny is not None:
        model = ImageTokenizer.tiny(args.tiny)
    elif args.tokenizer:
        model = ImageTokenizer.from_pretrained(args.tokenizer)
    else:
        model = ImageTokenizer.from_released(args.released, clip_folder=args.clip_dir)
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).frozen()


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    from libra_megatron.tokenizer.image_processing import (
        load_image,
        normalize_pixels,
        to_model_pixels,
        unit_range_to_pixels,
    )

    paths = find_images(args.inputs)[: args.max_images]
    if not paths:
        raise SystemExit("no images found")
    model = load_tokenizer(args)
    rows, kept, skipped = [], [], []
    for start in range(0, len(paths), args.batch_size):
        batch_paths, batch_pixels = [], []
        for path in paths[start : start + args.batch_size]:
            try:
                batch_pixels.append(to_model_pixels(load_image(path)))
                batch_paths.append(path)
            except ValueError as exc:
                logger.warning("skipping %s", exc)
                skipped.append(path)
        if not batch_pixels:
            continue
        pixels = torch.stack(batch_pixels)
        codes, _ = model.encode(normalize_pixels(pixels).to(args.device))
        recon = unit_range_to_pixels(model.decode(codes)).cpu()
        for i, path in enumerate(batch_paths):
            original = pixels[i].permute(1, 2, 0).numpy()
            rebuilt = recon[i].permute(1, 2, 0).numpy()
            pair = side_by_side(original, rebuilt)
            if args.per_image:
                name = os.path.splitext(os.path.basename(path))[0] + f".{start + i:04d}.png"
                save_png(pair, os.path.join(args.out, name))
            else:
                rows.append(pair)
            distinct = [len(torch.unique(codes[c, i])) for c in range(codes.size(0))]
            print(json.dumps({"image": path, "psnr_db": round(psnr(original, rebuilt), 2), "distinct_codes": distinct}))
            kept.append(path)
    if rows:
        gap = np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8)
        grid = np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0)
        save_png(grid, args.out)
    print(json.dumps({"written": os.path.abspath(args.out), "images": len(kept), "skipped": skipped}))


if __name__ == "__main__":
    main()
