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

from typing import Dict, List, Optional, Tuple

from torch import Tensor


class LibraKVCache:
    """Key/value memory ``[offset, b, heads/tp, d]`` per layer for one micro-batch.

    Each layer's memory is one preallocated buffer written in place: ``capacity`` positions when given (prompt plus
    the new tokens to generate), otherwise the prompt's length, doubling whenever a step does not fit. A decode step
    therefore copies only its own keys, never the whole memory."""

    def __init__(self, capacity: Optional[int] = None) -> None:
        self.capacity = capacity
        self._buffers: Dict[int, Tuple[Tensor, Tensor]] = {}
        self._lengths: Dict[int, int] = {}
        self.keep = 0
        """Leading positions of the current forward to store (set before every forward)."""

    def layers(self) -> List[int]:
        """The layer numbers that hold a memory."""
        return sorted(self._lengths)

    def has(self, layer_number: int) -> bool:
        """Whether ``layer_number`` already holds a prefilled memory (then a forward is a decode step)."""
        return layer_number in self._lengths

    def offset(self, layer_number: int) -> int:
        """Positions cached for ``layer_number``."""
        return self._lengths.get(layer_number, 0)

    def keys_values(self, layer_number: int) -> Tuple[Tensor, Tensor]:
        """The cached text key/value set ``[offset, b, heads, d]`` of ``layer_number`` (views of the buffer)."""
        keys, values = self._buffers[layer_number]
        length = self._lengths[layer_number]
        return keys[:length], values[:length]

    def extend(self, layer_number: int, keys: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
        """Write ``keys``/``values`` ``[s, b, heads, d]`` after the cached positions and return the cached set
        followed by them (``[offset + s, ...]`` views). Only the first ``keep`` of the ``s`` positions stay cached:
        the rest (padding after the real positions) is overwritten by the next step."""
        start = self.offset(layer_number)
        end = start + keys.shape[0]
        buffers = self._buffers.get(layer_number)
        if buffers is None or buffers[0].shape[0] < end:
            size = max(end, self.capacity or 0, 2 * buffers[0].shape[0] if buffers is not None else 0)
            grown = tuple(x.new_empty((size, *x.shape[1:])) for x in (keys, values))
            if buffers is not None:
                for new, old in zip(grown, buffers):
                    new[:start].copy_(old[:start])
            buffers = self._buffers[layer_number] = grown
        buffers[0][start:end].copy_(keys.detach())
        buffers[1][start:end].copy_(values.detach())
        self._lengths[layer_number] = start + min(self.keep, keys.shape[0])
        return buffers[0][:end], buffers[1][:end]
