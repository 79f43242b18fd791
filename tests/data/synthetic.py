"""Synthetic preprocessed datasets (written with the real writer, no image tokenizer) for the dataset tests.

Every image is a solid colour that encodes (dataset, document, image number), so a test can tell which image
landed where; text ids encode the document too.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

from libra_megatron.data.indexed import SampleWriter, index_dtype
from libra_megatron.data.pixel_codec import encode_pixels
from libra_megatron.data.samples import Piece, PieceKind
from libra_megatron.data.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, atomic_write_json, vocab_to_json
from libra_megatron.vocab import LibraVocab

SMALL_VOCAB = LibraVocab(text_vocab_size=512)


def image_colour(dataset: int, document: int, image: int) -> Tuple[int, int, int]:
    return dataset * 40 + image, document % 256, document // 256


def solid_pixels(colour: Sequence[int], size: int = 336) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, dtype=np.uint8).reshape(3, 1, 1), (3, size, size)).copy()


def document_pieces(rng: np.random.Generator, document: int, max_text: int, max_images: int) -> Tuple[List[Piece], int]:
    """Random pieces: <s>, then text / image pieces; text ids are ``3 + document % 500`` (never <s>, </s>)."""
    fill = 3 + document % 500
    pieces = [Piece(PieceKind.TEXT, (1,))]
    n_images = int(rng.integers(0, max_images + 1))
    for image in range(n_images):
        pieces.append(Piece(PieceKind.TEXT, (fill,) * int(rng.integers(0, 8))))
        pieces.append(Piece(PieceKind.IMAGE_TARGET if image % 2 == 0 else PieceKind.IMAGE, image=image))
    pieces.append(Piece(PieceKind.TEXT_TARGET, (fill,) * int(rng.integers(1, max_text + 1))))
    return [p for p in pieces if p.kind not in (PieceKind.TEXT, PieceKind.TEXT_TARGET) or p.ids], n_images


def write_synthetic(prefix: str, num_documents: int, seed: int, dataset: int = 0, max_text: int = 120,
                    max_images: int = 2, vocab: LibraVocab = SMALL_VOCAB, kind: str = "instruct") -> List[List[Piece]]:
    """Write ``num_documents`` random samples + a sidecar at ``prefix``; return their pieces."""
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = SampleWriter(prefix + ".bin", vocab)
    all_pieces = []
    images = 0
    for document in range(num_documents):
        pieces, n_images = document_pieces(rng, document, max_text, max_images)
        codes = [rng.integers(0, vocab.codebook_size, size=(2, vocab.patches_per_image)) for _ in range(n_images)]
        blobs = [encode_pixels(solid_pixels(image_colour(dataset, document, j)), "webp") for j in range(n_images)]
        writer.add_sample(pieces, codes, blobs)
        all_pieces.append(pieces)
        images += n_images
    writer.finalize(prefix + ".idx")
    atomic_write_json(prefix + ".json", {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "kind": kind, "vocab": vocab_to_json(vocab),
        "index_dtype": np.dtype(index_dtype(vocab)).name, "pixels": {"format": "webp", "size": 336},
        "counts": {"samples": num_documents, "images": images},
    })
    return all_pieces
