"""Lazy sources of HF-key-space parameters for the HF -> engine converters (picklable recipes for worker ranks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from libra_megatron.checkpoint.hf_libra import load_hf_libra_config, validate_hf_libra
from libra_megatron.checkpoint.safe_io import HFCheckpointReader
from libra_megatron.hf_modeling.configuration_libra import LibraConfig


class HFLibraSource:
    """A released / exported HF Libra folder (``libra-11b-base`` / ``-chat`` layout), validated on open."""

    def __init__(self, folder: str, copy_eos_to_pad: bool = False) -> None:
        self.folder = folder
        self.config: LibraConfig = load_hf_libra_config(folder)
        self.reader = HFCheckpointReader(folder)
        validate_hf_libra(self.reader, self.config)
        self.copy_eos_to_pad = copy_eos_to_pad

    def keys(self) -> List[str]:
        return self.reader.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.reader.shape(key)

    def get(self, key: str) -> torch.Tensor:
        value = self.reader.get(key)
        if key == "model.embed_tokens.weight" and self.copy_eos_to_pad:  # docs/architecture.md#initialisation, at the start of a stage
            value = value.clone()
            value[self.config.pad_token_id] = value[self.config.eos_token_id]
        return value


@dataclass(frozen=True)
class SourceRecipe:
    """How a worker rank opens the source: ``kind`` is ``hf`` or ``hf-llama``."""

    kind: str
    folder: str
    config: dict  # HF LibraConfig fields the engine model has (used by hf-llama for the new parameters)
    seed: int = 1234
    copy_eos_to_pad: bool = False

    def open(self):
        """The source object (opened in the process that reads it)."""
        if self.kind == "hf":
            return HFLibraSource(self.folder, self.copy_eos_to_pad)
        if self.kind == "hf-llama":
            from libra_megatron.checkpoint.hf_llama import LlamaAsLibra

            return LlamaAsLibra(self.folder, LibraConfig(**self.config), self.seed, self.copy_eos_to_pad)
        raise ValueError(f"unknown source kind {self.kind!r}")
