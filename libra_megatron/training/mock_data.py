"""``--mock-data``: deterministic synthetic pretraining samples in the batch contract (no files needed).

Sample ``i`` depends only on ``(seed, i)``: ``<s>``, one image span (``<boi>``, the patch codes, ``<eoi>``), ``\\n``,
a caption of text ids (1 to ``2 caption_tokens - 1`` of them, ``caption_tokens`` on average, like the short and
varied LAION captions), right padding. Labels follow docs/architecture.md#labels (image codes, ``<eoi>`` and the
caption carry loss;
``<s>``, ``<boi>``, ``\\n`` and padding do not), already shifted (Megatron convention). Rows have the layout of
``libra_megatron.data.dataset.LibraDataset`` rows (collated by its ``collate_batch``). The codes are a simple
function of the pixels' mean colour and the caption repeats a colour word, so the task is learnable.
"""
from __future__ import annotations

from typing import Dict

import torch

from libra_megatron.vocab import IGNORE_INDEX, LibraVocab


class MockPretrainDataset:
    """Synthetic image-caption samples of length ``seq_length`` indexed by global sample index (any int >= 0)."""

    def __init__(self, vocab: LibraVocab, seq_length: int, seed: int = 1234, image_size: int = 336,
                 caption_tokens: int = 8) -> None:
        needed = 2 + vocab.image_positions + 1
        if seq_length < needed:
            raise ValueError(f"--seq-length {seq_length} cannot hold one image sample ({needed} positions + caption)")
        self.vocab, self.seq_length, self.seed = vocab, seq_length, seed
        self.image_size = image_size
        self.max_caption_tokens = max(1, min(2 * caption_tokens - 1, seq_length - needed + 1))

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        vocab, length = self.vocab, self.seq_length
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        colour = int(torch.randint(0, 8, (1,), generator=generator))
        pixels = torch.full((3, self.image_size, self.image_size), 32 * colour, dtype=torch.uint8)
        pixels += torch.randint(0, 16, pixels.shape, generator=generator, dtype=torch.uint8)
        codes = (colour * 7 + torch.arange(vocab.patches_per_image)) % vocab.codebook_size
        codes = torch.stack([codes, (codes * 3 + 1) % vocab.codebook_size])  # [2, P]
        image = vocab.image_span(codes)  # [2, P + 2]
        first_word = 3 + colour * 5
        caption_tokens = int(torch.randint(1, self.max_caption_tokens + 1, (1,), generator=generator))
        caption = first_word + torch.randint(0, 5, (caption_tokens,), generator=generator)
        caption = caption.clamp_max(vocab.text_vocab_size - 1)
        text_prefix = torch.tensor([vocab.bos_id])
        text_suffix = torch.cat([torch.tensor([vocab.newline_id]), caption])
        ids = torch.cat([text_prefix.expand(2, 1), image, text_suffix.expand(2, -1)], dim=1)
        used = ids.shape[1]
        tokens = torch.full((2, length), vocab.pad_id, dtype=torch.long)
        tokens[:, :used] = ids
        unshifted = torch.full((2, length), IGNORE_INDEX, dtype=torch.long)
        image_start, image_end = 1, 1 + vocab.image_positions
        unshifted[:, image_start + 1:image_end] = tokens[:, image_start + 1:image_end]  # codes and <eoi>
        unshifted[:, image_end + 1:used] = tokens[:, image_end + 1:used]  # caption (not the newline)
        labels = torch.full_like(unshifted, IGNORE_INDEX)
        labels[:, :-1] = unshifted[:, 1:]
        vision_indices = torch.full((length,), vocab.text_vision_index, dtype=torch.long)
        vision_indices[image_start:image_end] = vocab.image_vision_indices()
        return {
            "tokens": tokens, "labels": labels, "vision_indices": vision_indices,
            "position_ids": torch.arange(length), "pixels": pixels.unsqueeze(0), "sample_id": int(index),
        }
