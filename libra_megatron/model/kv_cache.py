"""Per-layer key/value memory for incremental (greedy) decoding, in the style of megatron-core's
``InferenceContext`` / ``inference_params``: one object per micro-batch, keyed by the global layer number, with the
sequence offset (positions cached so far).

What is cached (docs/architecture.md#decoder-layer): a new position during decoding is always a *text* query, and a
text query attends the *text key/value set* ``K_for_text = merge(k_text, k_vision + Δk_vision)`` (RoPE applied):
text keys unbridged, image keys with their ``*_bridge_on_vision`` delta. That set, in sequence order, is exactly what
:class:`LibraKVCache` stores; the vision set is never needed again once the prompt has been read.

Use (see ``libra_megatron/evaluation/engine_captioning.py``): put one cache on the micro-batch's routing
(``routing.kv_cache``); the first forward over a layer stores its prompt keys (*prefill*), every later forward of that
layer is a *decode step* whose queries attend the cached keys plus their own. ``keep`` says how many of the step's
leading positions are real (the rest is padding, e.g. to a multiple of TP under sequence parallelism: causal
attention makes it invisible to the real positions) and are appended to the memory.
"""
from __future__ import annotations

from typing import Dict, Tuple

from torch import Tensor


class LibraKVCache:
    """Key/value memory ``[offset, b, heads/tp, d]`` per layer for one micro-batch."""

    def __init__(self) -> None:
        self.memory: Dict[int, Tuple[Tensor, Tensor]] = {}
        self.keep = 0
        """Leading positions of the current forward to store (set before every forward)."""

    def has(self, layer_number: int) -> bool:
        """Whether ``layer_number`` already holds a prefilled memory (then a forward is a decode step)."""
        return layer_number in self.memory

    def offset(self, layer_number: int) -> int:
        """Positions cached for ``layer_number``."""
        return self.memory[layer_number][0].shape[0] if layer_number in self.memory else 0

    def keys_values(self, layer_number: int) -> Tuple[Tensor, Tensor]:
        """The cached text key/value set ``[offset, b, heads, d]`` of ``layer_number``."""
        return self.memory[layer_number]

    def append(self, layer_number: int, keys: Tensor, values: Tensor) -> None:
        """Store the first ``keep`` positions of ``keys``/``values`` ``[s, b, heads, d]`` after the cached ones."""
        import torch

        keys, values = keys[: self.keep].detach(), values[: self.keep].detach()
        if layer_number in self.memory:
            old_k, old_v = self.memory[layer_number]
            keys, values = torch.cat([old_k, keys]), torch.cat([old_v, values])
        else:
            keys, values = keys.clone(), values.clone()
        self.memory[layer_number] = (keys, values)
