"""LibraLayer (routed norm → bridge attention → routed norm → routed MLP) and the block that runs them.

The residual stream is sorted by modality (routing.py): inside a stage it is a pair ``(text rows, vision rows)``
(``[n, h]`` each; under sequence parallelism this rank's part of its chunk), so norms, linears and the MLP work on
their modality's rows with no per-layer split or merge, and the residual adds are two plain adds. The block turns
the ``[s(/t), b, h]`` tensor megatron passes between stages (sorted rows) into that pair once and back once.

The routing of a micro-batch reaches every layer as an explicit argument: ``block(hidden, routing)`` calls
``layer(stream, routing)``. Under activation recompute the block checkpoints closures that capture that
micro-batch's routing object, so a backward that replays a layer (also under 1F1B, where the backward of
micro-batch i runs after the forward of i+k) sees exactly the routing its forward saw — no global state, no
tensor encoding. ``recompute_granularity='full'`` with ``recompute_method`` 'uniform' or 'block' follows
megatron-core's TransformerBlock semantics; 'selective' checkpoints the attention core and/or the MLP.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Tuple, Union

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import BaseTransformerLayer, get_transformer_layer_offset
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

from libra_megatron.config import LibraConfig
from libra_megatron.model.cuda_graphs import LayerGraphs, layer_graphs
from libra_megatron.model.routing import ModalityRouting


@dataclass
class LibraLayerSubmodules:
    """Submodules of one Libra decoder layer (classes or ModuleSpecs)."""

    input_layernorm: Union[ModuleSpec, type]
    self_attention: Union[ModuleSpec, type]
    pre_mlp_layernorm: Union[ModuleSpec, type]
    mlp: Union[ModuleSpec, type]


class LibraLayer(MegatronModule, BaseTransformerLayer):
    """One decoder layer; ``forward(hidden [s(/t), b, h], routing) -> hidden``."""

    def __init__(
        self, config: LibraConfig, submodules: LibraLayerSubmodules, layer_number: int = 1, pg_collection=None,
        vp_stage=None, **kwargs,
    ) -> None:
        super().__init__(config=config)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = build_module(submodules.input_layernorm, config=config, hidden_size=h, eps=eps)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=self.layer_number, pg_collection=pg_collection
        )
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config=config, hidden_size=h, eps=eps)
        self.mlp = build_module(submodules.mlp, config=config, pg_collection=pg_collection)
        self.sequence_parallel = bool(config.sequence_parallel) and config.tensor_model_parallel_size > 1

    def forward(self, stream: Tuple[Tensor, Tensor], routing: ModalityRouting) -> Tuple[Tensor, Tensor]:
        """``stream``: this rank's residual rows ``(text, vision)`` → the same after attention and MLP."""
        text, vision = stream
        out_t, out_v = self.self_attention(*self._normed_rows(self.input_layernorm, text, vision, routing), routing)
        text, vision = self._add_residual(text, vision, out_t, out_v, routing)
        out_t, out_v = self.mlp(*self._normed_rows(self.pre_mlp_layernorm, text, vision, routing))
        return self._add_residual(text, vision, out_t, out_v, routing)

    def _normed_rows(self, norm, text: Tensor, vision: Tensor, routing: ModalityRouting) -> Tuple[Tensor, Tensor]:
        text, vision = norm(text, vision)
        if not self.sequence_parallel:
            return text, vision
        full = gather_from_sequence_parallel_region(torch.cat([text, vision]), tensor_parallel_output_grad=False)
        return full.split([routing.full.num_text, routing.full.num_vision])

    def _add_residual(self, text: Tensor, vision: Tensor, out_t: Tensor, out_v: Tensor,
                      routing: ModalityRouting) -> Tuple[Tensor, Tensor]:
        if self.sequence_parallel:  # complete rows -> this rank's chunk of the sorted stream
            local = scatter_to_sequence_parallel_region(torch.cat([out_t, out_v]))
            out_t, out_v = local.split([routing.local_text_rows, routing.local_rows - routing.local_text_rows])
        return text + out_t, vision + out_v


class LibraTransformerBlock(TransformerBlock):
    """megatron-core's TransformerBlock (layer building, PP offsets, stacked checkpoint keys) with a routed forward."""

    def forward(self, hidden_states: Tensor, routing: ModalityRouting) -> Tensor:  # type: ignore[override]
        """Run this stage's layers; input is the embedding (first stage) or the received tensor (set_input_tensor)."""
        if not self.pre_process:
            hidden_states = self.input_tensor
        shape = hidden_states.shape
        rows = hidden_states.reshape(routing.local_rows, -1)  # sorted rows: text block, then vision block
        stream = tuple(rows.split([routing.local_text_rows, routing.local_rows - routing.local_text_rows]))
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        with rng:
            if self.config.recompute_granularity == "full" and self.training:
                stream = self._checkpointed_layers(stream, routing)
            elif len(self.layers) and LayerGraphs.applicable(self.config, routing, stream[0], self.training):
                stream = layer_graphs(self)(stream, routing)  # fixed layout: replay the captured CUDA graphs
            else:
                for layer in self.layers:
                    stream = layer(stream, routing)
        return make_viewless_tensor(inp=torch.cat(stream).view(shape), requires_grad=True, keep_graph=True)

    def _checkpointed_layers(self, stream: Tuple[Tensor, Tensor], routing: ModalityRouting) -> Tuple[Tensor, Tensor]:
        def run(start: int, end: int):
            def custom_forward(text: Tensor, vision: Tensor) -> Tuple[Tensor, Tensor]:
                stream = (text, vision)
                for layer in self.layers[start:end]:
                    stream = layer(stream, routing)
                return stream

            return custom_forward

        num_layers, chunk = len(self.layers), self.config.recompute_num_layers
        distribute = self.config.distribute_saved_activations
        if self.config.recompute_method == "uniform":
            for start in range(0, num_layers, chunk):
                stream = tensor_parallel.checkpoint(run(start, min(start + chunk, num_layers)), distribute, *stream)
        elif self.config.recompute_method == "block":
            for index in range(num_layers):
                if index < chunk:
                    stream = tensor_parallel.checkpoint(run(index, index + 1), distribute, *stream)
                else:
                    stream = run(index, index + 1)(*stream)
        else:
            raise ValueError(f"recompute_method must be 'uniform' or 'block', got {self.config.recompute_method!r}")
        return tuple(stream)
