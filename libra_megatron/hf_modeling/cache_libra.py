"""The KV cache of ``LibraForCausalLM`` (shipped with every export; imports only ``torch``)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


class LibraCache:
    """Per-layer keys/values for text queries and for vision queries (RoPE and bridge applied), plus modality history.

    ``key_text[i]`` is K^(T) of docs/architecture.md#decoder-layer (bridge added on vision positions), ``key_vision[i]`` is K^(V) (bridge
    added on text positions); values likewise; every tensor is [B, H, S, D]. ``vision_flag`` is [B, S].
    """

    def __init__(self, num_layers: int) -> None:
        self.key_text: List[Optional[torch.Tensor]] = [None] * num_layers
        self.key_vision: List[Optional[torch.Tensor]] = [None] * num_layers
        self.value_text: List[Optional[torch.Tensor]] = [None] * num_layers
        self.value_vision: List[Optional[torch.Tensor]] = [None] * num_layers
        self.vision_flag: Optional[torch.Tensor] = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions."""
        return 0 if self.vision_flag is None else self.vision_flag.shape[1]

    def __len__(self) -> int:
        return len(self.key_text)

    def update(self, layer_idx: int, k_text, k_vision, v_text, v_vision) -> Tuple[torch.Tensor, ...]:
        """Append this step's per-modality keys/values of one layer; return the full ones."""
        new = (k_text, k_vision, v_text, v_vision)
        stores = (self.key_text, self.key_vision, self.value_text, self.value_vision)
        out = []
        for store, value in zip(stores, new):
            past = store[layer_idx]
            full = value if past is None else torch.cat([past, value], dim=2)
            store[layer_idx] = full
            out.append(full)
        return tuple(out)

    def append_modality(self, vision_flag: torch.Tensor) -> None:
        """Record the modality of the positions this forward adds."""
        self.vision_flag = vision_flag if self.vision_flag is None else torch.cat([self.vision_flag, vision_flag], dim=1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for store in (self.key_text, self.key_vision, self.value_text, self.value_vision):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))
        if self.vision_flag is not None:
            self.vision_flag = self.vision_flag.index_select(0, beam_idx.to(self.vision_flag.device))
