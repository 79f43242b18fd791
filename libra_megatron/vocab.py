"""The Libra id space shared by the tokenizer, the data pipeline and the model (docs/architecture.md#sequence-and-routing, docs/architecture.md#ids).

Model-space ids, per codebook plane ``c`` (two planes):
    0 .. T-1            text ids (T = text vocab, 32000 for LLaMA-2; both planes hold the same id)
    T .. T+K-1          image code ``k`` of codebook ``c`` (K = 512 codes per codebook)
    T+K                 ``<boi>`` (both planes)
    T+K+1               ``<eoi>`` (both planes)
An image is ``<boi>``, the 24x24 patch codes in raster order, ``<eoi>``: 578 positions. ``vision_indices``
is 0 for ``<boi>``, k+1 for patch k, 577 for ``<eoi>`` and 578 (= "not vision") at text positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LibraVocab:
    """Sizes and special ids of the two-plane Libra vocabulary."""

    text_vocab_size: int = 32000
    codebook_size: int = 512
    num_codebooks: int = 2
    image_resolution: int = 24
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    newline_id: int = 13

    @property
    def patches_per_image(self) -> int:
        return self.image_resolution**2

    @property
    def image_positions(self) -> int:
        """Positions one image occupies: <boi> + patches + <eoi> (578 for Libra)."""
        return self.patches_per_image + 2

    @property
    def vision_vocab_size(self) -> int:
        """Classes of one vision head: the codes plus <boi> and <eoi> (514 for Libra)."""
        return self.codebook_size + 2

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size

    @property
    def boi_id(self) -> int:
        return self.text_vocab_size + self.codebook_size

    @property
    def eoi_id(self) -> int:
        return self.text_vocab_size + self.codebook_size + 1

    @property
    def total_vocab_size(self) -> int:
        """Size of the unified id space of one plane (32514 for Libra)."""
        return self.text_vocab_size + self.vision_vocab_size

    @property
    def text_vision_index(self) -> int:
        """The ``vision_indices`` value of a text position (578 for Libra)."""
        return self.image_positions

    def image_span(self, codes: torch.Tensor) -> torch.Tensor:
        """Model-space ids of whole images: codes ``[C, ..., P]`` in 0..K-1 -> ``[C, ..., P+2]`` with <boi>/<eoi>."""
        if codes.size(0) != self.num_codebooks or codes.size(-1) != self.patches_per_image:
            raise ValueError(
                f"image codes must be [{self.num_codebooks}, ..., {self.patches_per_image}], got {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"image codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        shape = (*codes.shape[:-1], 1)
        boi = torch.full(shape, self.boi_id, dtype=torch.long, device=codes.device)
        eoi = torch.full(shape, self.eoi_id, dtype=torch.long, device=codes.device)
        return torch.cat([boi, codes.long() + self.image_offset, eoi], dim=-1)

    def image_vision_indices(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``vision_indices`` of one image span: 0, 1, ..., 577."""
        return torch.arange(self.image_positions, dtype=torch.long, device=device)


LIBRA_VOCAB = LibraVocab()
