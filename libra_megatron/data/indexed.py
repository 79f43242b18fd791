"""Libra samples in megatron-core's indexed ``.bin/.idx`` format (multimodal mode).

Layout: one *document* per sample; its *sequences* are the sample's pieces in order, each with its
:class:`~libra_megatron.data.samples.PieceKind` as the sequence mode (``sequence_modes``, int8):

====  ==============  =============================================================================
mode  kind            contents (index dtype, uint16 unless the text vocabulary needs int32)
====  ==============  =============================================================================
0     TEXT            text ids, not loss targets
1     TEXT_TARGET     text ids that are loss targets
2     IMAGE           the codes of one image, plane-major: ``[2 * 576]`` in ``0..511``
3     IMAGE_TARGET    same, with the codes and ``<eoi>`` as loss targets
4     PIXELS          the encoded pixels of the image just before: element 0 = pad bytes, then the bytes
====  ==============  =============================================================================

A sample is therefore one contiguous read of the ``.bin``; its token length is known from the ``.idx`` alone
(:func:`sample_token_lengths`). Writing goes through megatron-core's ``IndexedDatasetBuilder``; reading through
its ``IndexedDataset``. :func:`merge_indexed` joins finished parts with numpy (megatron-core's ``add_index``
keeps every length in Python lists, which does not scale to 10^8 sequences); the result is byte-identical to
``add_index`` (tested).
"""
from __future__ import annotations

import os
import shutil
import struct
from typing import List, Sequence, Tuple

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from libra_megatron.data.samples import Piece, PieceKind, piece_length
from libra_megatron.vocab import LibraVocab


def index_dtype(vocab: LibraVocab) -> type:
    """uint16 when every stored id fits (LLaMA-2: 32000 text ids, 512 codes), else int32."""
    return np.uint16 if max(vocab.text_vocab_size, vocab.codebook_size) <= 65536 else np.int32


def pack_bytes(data: bytes, dtype: type) -> np.ndarray:
    """Bytes -> index-dtype array: element 0 = number of pad bytes appended, then the padded bytes."""
    itemsize = np.dtype(dtype).itemsize
    pad = (-len(data)) % itemsize
    body = np.frombuffer(data + b"\x00" * pad, dtype=dtype)
    return np.concatenate([np.array([pad], dtype=dtype), body])


def unpack_bytes(array: np.ndarray) -> bytes:
    """Inverse of :func:`pack_bytes`."""
    pad = int(array[0])
    raw = np.ascontiguousarray(array[1:]).tobytes()
    return raw[: len(raw) - pad] if pad else raw


class SampleWriter:
    """Appends samples (pieces + image codes + encoded pixels) to ``PREFIX.bin`` via megatron-core's builder."""

    def __init__(self, bin_path: str, vocab: LibraVocab):
        self.vocab = vocab
        self.dtype = index_dtype(vocab)
        self.builder = IndexedDatasetBuilder(bin_path, dtype=self.dtype, multimodal=True)
        self.samples = 0

    def add_sample(self, pieces: Sequence[Piece], codes: Sequence[np.ndarray], pixel_blobs: Sequence[bytes]) -> None:
        """Write one sample; ``codes[j]`` (``[2, 576]``) and ``pixel_blobs[j]`` belong to image ``j``."""
        vocab = self.vocab
        for piece in pieces:
            if piece.kind in (PieceKind.TEXT, PieceKind.TEXT_TARGET):
                ids = np.asarray(piece.ids, dtype=np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab.text_vocab_size):
                    raise ValueError(f"text id out of range [0, {vocab.text_vocab_size}): {ids.min()}..{ids.max()}")
                self.builder.add_item(torch.from_numpy(ids), int(piece.kind))
            elif piece.kind in (PieceKind.IMAGE, PieceKind.IMAGE_TARGET):
                image_codes = np.asarray(codes[piece.image], dtype=np.int64)
                expected = (vocab.num_codebooks, vocab.patches_per_image)
                if image_codes.shape != expected:
                    raise ValueError(f"image codes must be {expected}, got {image_codes.shape}")
                if image_codes.min() < 0 or image_codes.max() >= vocab.codebook_size:
                    raise ValueError(f"image codes out of range [0, {vocab.codebook_size})")
                self.builder.add_item(torch.from_numpy(image_codes.reshape(-1)), int(piece.kind))
                packed = pack_bytes(pixel_blobs[piece.image], self.dtype).astype(np.int64)
                self.builder.add_item(torch.from_numpy(packed), int(PieceKind.PIXELS))
            else:
                raise ValueError(f"cannot write a piece of kind {piece.kind!r}")
        self.builder.end_document()
        self.samples += 1

    def finalize(self, idx_path: str) -> None:
        """Close the ``.bin`` and write the ``.idx``."""
        self.builder.finalize(idx_path)


class SampleReader:
    """Random access to the stored pieces of sample ``i`` (one contiguous read) over megatron-core's reader."""

    def __init__(self, prefix: str, mmap: bool = True):
        if not IndexedDataset.exists(prefix):
            raise FileNotFoundError(f"no indexed dataset at {prefix}.bin/.idx")
        self.prefix = prefix
        self.dataset = IndexedDataset(prefix, multimodal=True, mmap=mmap)

    @property
    def document_indices(self) -> np.ndarray:
        return self.dataset.index.document_indices

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.dataset.index.sequence_lengths

    @property
    def sequence_modes(self) -> np.ndarray:
        return self.dataset.index.sequence_modes

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def pieces(self, sample: int) -> List[Tuple[int, np.ndarray]]:
        """``[(kind, array), ...]`` of one sample, in order (copies: megatron-core unmaps its views when the
        reader is garbage collected)."""
        if not 0 <= sample < len(self):
            raise IndexError(f"sample {sample} out of range for {self.prefix} ({len(self)} samples)")
        start, end = int(self.document_indices[sample]), int(self.document_indices[sample + 1])
        arrays, modes = self.dataset[start:end]
        return [(int(mode), np.array(array)) for mode, array in zip(modes, arrays)]


def sample_token_lengths(reader: SampleReader, vocab: LibraVocab) -> np.ndarray:
    """Sequence length (positions) of every sample, from the ``.idx`` alone: ``int64 [num_samples]``."""
    modes = reader.sequence_modes.astype(np.int64)
    lengths = reader.sequence_lengths.astype(np.int64)
    is_text = modes <= int(PieceKind.TEXT_TARGET)
    is_image = (modes == int(PieceKind.IMAGE)) | (modes == int(PieceKind.IMAGE_TARGET))
    per_sequence = np.where(is_text, lengths, 0) + np.where(is_image, vocab.image_positions, 0)
    cumulative = np.concatenate([[0], np.cumsum(per_sequence)])
    bounds = reader.document_indices.astype(np.int64)
    return cumulative[bounds[1:]] - cumulative[bounds[:-1]]


def truncated_length(kinds: Sequence[int], sizes: Sequence[int], vocab: LibraVocab, max_length: int) -> int:
    """Length a sample keeps under :func:`~libra_megatron.data.samples.assemble`'s truncation rule."""
    length = 0
    for kind, size in zip(kinds, sizes):
        positions = piece_length(int(kind), int(size), vocab)
        if positions == 0:
            continue
        if int(kind) in (PieceKind.IMAGE, PieceKind.IMAGE_TARGET):
            if length + positions > max_length:
                break
            length += positions
        else:
            length += min(positions, max_length - length)
            if length >= max_length:
                break
    return length


def effective_lengths(reader: SampleReader, vocab: LibraVocab, max_length: int) -> np.ndarray:
    """Per-sample lengths after truncation to ``max_length`` (exact; only long samples are walked)."""
    lengths = sample_token_lengths(reader, vocab)
    long_samples = np.nonzero(lengths > max_length)[0]
    bounds = reader.document_indices
    for sample in long_samples.tolist():
        start, end = int(bounds[sample]), int(bounds[sample + 1])
        lengths[sample] = truncated_length(
            reader.sequence_modes[start:end], reader.sequence_lengths[start:end], vocab, max_length
        )
    return lengths


def _read_index_arrays(prefix: str) -> Tuple[type, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Copies of one ``.idx``'s arrays (megatron-core's reader unmaps them when it is garbage collected)."""
    dataset = IndexedDataset(prefix, multimodal=True, mmap=False)
    index = dataset.index
    arrays = (np.array(index.sequence_lengths), np.array(index.sequence_pointers), np.array(index.document_indices),
              np.array(index.sequence_modes))
    return (index.dtype, *arrays)


def merge_indexed(prefixes: Sequence[str], output_prefix: str, dtype: type) -> None:
    """Concatenate indexed datasets into ``output_prefix.bin/.idx`` (same bytes as megatron-core's
    ``IndexedDatasetBuilder.add_index`` + ``finalize``). Writes ``.bin`` then ``.idx``; the caller renames."""
    counts = []
    for prefix in prefixes:
        part_dtype, lengths, _, documents, _ = _read_index_arrays(prefix)
        if part_dtype != dtype:
            raise ValueError(f"{prefix}.idx has dtype {part_dtype.__name__}, expected {np.dtype(dtype).name}")
        counts.append((len(lengths), len(documents) - 1))
    total_sequences = sum(c[0] for c in counts)
    total_documents = sum(c[1] for c in counts) + 1
    itemsize = np.dtype(dtype).itemsize

    with open(get_bin_path(output_prefix), "wb") as out:
        for prefix in prefixes:
            with open(get_bin_path(prefix), "rb") as part:
                shutil.copyfileobj(part, out, length=16 << 20)
        out.flush()
        os.fsync(out.fileno())

    with open(get_idx_path(output_prefix), "wb") as out:
        out.write(_INDEX_HEADER)
        out.write(struct.pack("<Q", 1))
        out.write(struct.pack("<B", DType.code_from_dtype(dtype)))
        out.write(struct.pack("<Q", total_sequences))
        out.write(struct.pack("<Q", total_documents))
        for prefix in prefixes:  # sequence lengths
            out.write(np.asarray(_read_index_arrays(prefix)[1], dtype=np.int32).tobytes())
        byte_offset = 0
        for prefix in prefixes:  # sequence pointers, rebased
            _, lengths, _, _, _ = _read_index_arrays(prefix)
            local = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * itemsize)[:-1]]) if len(lengths) else []
            out.write((np.asarray(local, dtype=np.int64) + byte_offset).tobytes())
            byte_offset += int(lengths.astype(np.int64).sum()) * itemsize
        out.write(np.zeros(1, dtype=np.int64).tobytes())
        sequence_offset = 0
        for prefix in prefixes:  # document indices, rebased (each part's leading 0 dropped)
            _, lengths, _, documents, _ = _read_index_arrays(prefix)
            out.write((documents[1:].astype(np.int64) + sequence_offset).tobytes())
            sequence_offset += len(lengths)
        for prefix in prefixes:  # sequence modes
            out.write(np.asarray(_read_index_arrays(prefix)[4], dtype=np.int8).tobytes())
        out.flush()
        os.fsync(out.fileno())
