#!/usr/bin/env python
"""A small, learnable image-caption corpus for the CPU demo: coloured shapes at named positions.

Each image is a 336x336 picture of one shape (circle, square, triangle) in one of five colours at one of five
places (left, right, top, bottom, centre), with jittered size and offset on a light background with a little
noise; its caption names all three, e.g. ``"a red circle on the left"``. Writes ``images/*.png`` plus
``train.jsonl`` and ``heldout.jsonl`` (fields ``image``, ``caption``), the image-folder layout
``tools/preprocess_images.py --input-format image-folder`` reads. Deterministic in ``--seed``.

    python examples/demo_corpus.py --output demo_out/corpus --train 1500 --heldout 12
"""
from __future__ import annotations

import argparse
import json
import os
import random
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw

SIZE = 336
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
PLACES: Dict[str, Tuple[float, float]] = {
    "on the left": (0.27, 0.5), "on the right": (0.73, 0.5), "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73), "in the center": (0.5, 0.5),
}


def draw(shape: str, colour: str, place: str, rng: random.Random) -> Image.Image:
    """One picture: the shape centred near ``place`` with random size/offset, background with noise."""
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (SIZE, SIZE), (shade, shade, shade - rng.randint(0, 10)))
    pen = ImageDraw.Draw(image)
    for _ in range(30):  # a little background clutter so images are not trivially identical
        x, y = rng.randrange(SIZE), rng.randrange(SIZE)
        grey = rng.randint(190, 215)
        pen.point((x, y), fill=(grey, grey, grey))
    fx, fy = PLACES[place]
    cx = fx * SIZE + rng.uniform(-12, 12)
    cy = fy * SIZE + rng.uniform(-12, 12)
    r = rng.uniform(55, 75)
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return image


def caption(shape: str, colour: str, place: str) -> str:
    """The caption of a picture (lower case, as the Libra caption processor leaves it)."""
    return f"a {colour} {shape} {place}"


def all_captions() -> List[str]:
    """Every caption the corpus can contain (e.g. to train the demo's text tokenizer and base LM)."""
    return [caption(s, c, p) for s in SHAPES for c in COLOURS for p in PLACES]


def generate(output: str, train: int, heldout: int, seed: int = 0) -> Dict[str, str]:
    """Write the corpus; returns the paths of ``train.jsonl``, ``heldout.jsonl`` and the image folder."""
    rng = random.Random(seed)
    images = os.path.join(output, "images")
    os.makedirs(images, exist_ok=True)
    paths = {"train": os.path.join(output, "train.jsonl"), "heldout": os.path.join(output, "heldout.jsonl"),
             "images": images}
    for split, count in (("train", train), ("heldout", heldout)):
        rows = []
        for index in range(count):
            shape, colour, place = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(PLACES))
            name = f"{split}_{index:05d}.png"
            draw(shape, colour, place, rng).save(os.path.join(images, name))
            rows.append({"image": name, "caption": caption(shape, colour, place)})
        temporary = paths[split] + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        os.replace(temporary, paths[split])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--heldout", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(generate(args.output, args.train, args.heldout, args.seed)))


if __name__ == "__main__":
    main()
