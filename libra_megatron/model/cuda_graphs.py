"""CUDA graphs of a stage's Libra layers for micro-batches of a fixed layout (``config.layer_cuda_graphs``).

The layer is host-bound on an H100/H200 (docs/benchmarks.md: every op costs more CPU time than GPU time), so for the
common case — every micro-batch of the run has the same segment layout (plain pretraining: ``<s>``, one image,
caption) — the forward and backward of all layers of a stage are captured once per layout with
``torch.cuda.make_graphed_callables`` and replayed: one graph launch per direction instead of ~100 kernels and
~60 autograd nodes per layer.

What a graph bakes in and how it stays correct:

* the residual stream and the RoPE tables are graph *inputs* (copied into the graph's static buffers on every
  replay), so micro-batches with other positions are fine;
* the routing's index tensors (sorted/sequence row maps) and segments are constants of the layout, which is the
  cache key (segments, batch, sequence length, dtype); other layouts (packing, mixed layouts) run eagerly;
* parameters are graph inputs of the captured module, so their gradients flow through the usual ``AccumulateGrad``
  (megatron DDP's grad hooks fire as in eager mode and move them into ``main_grad``). A graph returns its gradients
  in static memory that the next replay overwrites, and ``AccumulateGrad`` may adopt such a tensor as ``.grad``;
  without megatron DDP (no ``main_grad``) each trainable parameter therefore gets a hook that clones its gradient.

Restrictions (checked, the eager path runs otherwise): CUDA tensors, TP = 1 (no NCCL calls inside a capture), PP = 1
(a graph's activations live in its static memory, so each forward must be followed by its own backward before the
next forward — megatron's no-pipelining schedule does that, 1F1B keeps several micro-batches in flight), no
activation recompute, training mode with grad enabled, no fused gradient accumulation (its ``main_grad`` writes
are side effects a capture's warm-up would repeat and a replay cannot flag to DDP), no module hooks on the layers
(megatron DDP's ``overlap_param_gather`` registers forward pre-hooks: capture is refused with an error naming the
flag). At most ``MAX_LAYOUTS`` layouts are captured (each holds a stage's activations in its own memory pool); later
layouts run eagerly. The trainer also asks for ``--sequence-padding fixed`` so a run has one layout.
Tested on a GPU only (tests/model/test_cuda_graphs.py, run by bench/gpu_check_layer.sh).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Tuple

import torch
from megatron.core import parallel_state
from torch import Tensor

from libra_megatron.model.rotary import RotaryTables
from libra_megatron.model.routing import ModalityRouting


class _StageLayers(torch.nn.Module):
    """The stage's layers as one module ``(text, vision, cos, sin) -> (text, vision)`` for one captured layout."""

    def __init__(self, layers: torch.nn.ModuleList, routing: ModalityRouting) -> None:
        super().__init__()
        self.layers = layers
        self.routing = routing

    def forward(self, text: Tensor, vision: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
        routing = replace(self.routing, rotary=RotaryTables(cos, sin))
        stream = (text, vision)
        for layer in self.layers:
            stream = layer(stream, routing)
        return stream


MAX_LAYOUTS = 4


class LayerGraphs:
    """Per-layout cache of graphed callables of one stage's layers (at most ``MAX_LAYOUTS``)."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.layers = layers
        self.graphs: Dict[tuple, object] = {}

    @staticmethod
    def applicable(config, routing: ModalityRouting, text: Tensor, training: bool) -> bool:
        """Whether this micro-batch can run through a graph (see the module docstring)."""
        return (bool(config.layer_cuda_graphs) and text.is_cuda and routing.uniform and training
                and torch.is_grad_enabled() and config.recompute_granularity is None
                and not config.gradient_accumulation_fusion
                and parallel_state.get_tensor_model_parallel_world_size() == 1
                and parallel_state.get_pipeline_model_parallel_world_size() == 1)

    def __call__(self, stream: Tuple[Tensor, Tensor], routing: ModalityRouting) -> Tuple[Tensor, Tensor]:
        text, vision = stream
        cos, sin = routing.rotary.cos, routing.rotary.sin
        key = (tuple(routing.time_segments), routing.batch, routing.seq_length, text.dtype, text.device)
        graphed = self.graphs.get(key)
        if graphed is None and len(self.graphs) >= MAX_LAYOUTS:  # no new memory pool: this layout runs eagerly
            return tuple(_StageLayers(self.layers, routing)(text, vision, cos, sin))
        if graphed is None:
            graphed = self._capture(routing, text, vision, cos, sin)
            self.graphs[key] = graphed
        return tuple(graphed(text, vision, cos, sin))

    def _capture(self, routing: ModalityRouting, text: Tensor, vision: Tensor, cos: Tensor, sin: Tensor):
        hooked = [name for name, m in self.layers.named_modules()
                  if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
        if hooked:
            raise RuntimeError(
                f"layer_cuda_graphs: the layers have module hooks ({hooked[:3]}...), which CUDA graphs cannot "
                "capture (megatron DDP adds them for --overlap-param-gather); turn one of the two off")
        for param in self.layers.parameters():
            if param.requires_grad and not hasattr(param, "main_grad") and not getattr(param, "_libra_graph_hook", False):
                param.register_hook(torch.clone)  # see the module docstring: never keep static graph memory as .grad
                param._libra_graph_hook = True
        module = _StageLayers(self.layers, routing)
        sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in (text, vision)) + (
            cos.detach().clone(), sin.detach().clone())
        return torch.cuda.make_graphed_callables(module, sample, num_warmup_iters=3)


def layer_graphs(block) -> LayerGraphs:
    """The block's graph cache (created on first use)."""
    graphs = getattr(block, "_libra_layer_graphs", None)
    if graphs is None:
        graphs = LayerGraphs(block.layers)
        block._libra_layer_graphs = graphs
    return graphs
