"""ModuleSpecs that assemble a Libra decoder layer and block (swap a submodule here to change a backend)."""
from __future__ import annotations

from typing import Optional, Union

from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from libra_megatron.config import LibraConfig
from libra_megatron.model.bridge_attention import LibraAttentionSubmodules, LibraBridgeAttention
from libra_megatron.model.core_attention import SDPACoreAttention
from libra_megatron.model.layer import LibraLayer, LibraLayerSubmodules
from libra_megatron.model.mlp import LibraRoutedMLP
from libra_megatron.model.routed_norm import RoutedRMSNorm


def get_libra_layer_spec(core_attention: Union[ModuleSpec, type] = SDPACoreAttention) -> ModuleSpec:
    """One Libra layer: routed RMSNorm, bridge attention, routed RMSNorm, routed SwiGLU.

    ``core_attention``: the softmax(QK^T)V backend (core_attention.py's contract; default torch SDPA).
    """
    return ModuleSpec(
        module=LibraLayer,
        submodules=LibraLayerSubmodules(
            input_layernorm=RoutedRMSNorm,
            self_attention=ModuleSpec(module=LibraBridgeAttention,
                                      submodules=LibraAttentionSubmodules(core_attention=core_attention)),
            pre_mlp_layernorm=RoutedRMSNorm,
            mlp=ModuleSpec(module=LibraRoutedMLP),
        ),
    )


def get_libra_block_spec(config: LibraConfig, vp_stage: Optional[int] = None,
                         layer_spec: Optional[ModuleSpec] = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers (``layer_spec``, default :func:`get_libra_layer_spec`) plus the routed final
    norm (built on the last stage only)."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    num_layers = get_num_layers_to_build(config, vp_stage, pp_rank)
    layer_spec = layer_spec if layer_spec is not None else get_libra_layer_spec()
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=RoutedRMSNorm)
