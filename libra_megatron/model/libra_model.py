"""LibraModel: the Libra decoder on megatron-core, one pipeline stage (or the whole model) per instance.

    model = LibraModel(config, pre_process=is_first_stage, post_process=is_last_stage, vp_stage=None)
    out = model(tokens, vision_indices, position_ids, labels=labels, clip_features=feats, segment_ids=None)

Last stage with labels: per-position loss ``[B, L]`` (fp32, 0 at ignored positions) — feed it to
:func:`libra_loss_reduction` in the training loop's ``loss_func``. Last stage without labels: the reference's
unified logits ``[C, B, L, T+K+2]``. Other stages: hidden states ``[s(/t under SP), b, h]`` for the next stage.
``vision_indices`` and ``position_ids`` are needed on every stage, ``tokens``/``clip_features`` on the first,
``labels`` on the last; see docs/design.md ("Model").
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from libra_megatron.config import LibraConfig
from libra_megatron.model.embedding import LibraEmbedding, sequence_parallel_scatter
from libra_megatron.model.kv_cache import LibraKVCache
from libra_megatron.model.layer import LibraTransformerBlock
from libra_megatron.model.micro_batch import build_micro_batch_routing
from libra_megatron.model.output import position_losses, unified_logits
from libra_megatron.model.routed_linear import ReplicatedLinear, column_parallel, normal_init, param_device
from libra_megatron.model.routing import ModalityRouting
from libra_megatron.model.specs import get_libra_block_spec
from libra_megatron.model.training_stages import is_trainable_in_stage


class LibraModel(LanguageModule):
    """Routed embedding → Libra decoder layers → routed final norm → text/vision heads (+ loss)."""

    def __init__(
        self, config: LibraConfig, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
        pg_collection=None, layer_spec: Optional[ModuleSpec] = None,
    ) -> None:
        """``layer_spec``: the decoder layer's ModuleSpec (default ``specs.get_libra_layer_spec()``; e.g. another
        core-attention backend)."""
        super().__init__(config=config, pg_collection=pg_collection)
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.share_embeddings_and_output_weights = False
        self.vocab = config.vocab
        if pre_process:
            self.embedding = LibraEmbedding(config)
        self.decoder = LibraTransformerBlock(
            config=config, spec=get_libra_block_spec(config, vp_stage, layer_spec), pre_process=pre_process,
            post_process=post_process, vp_stage=vp_stage, pg_collection=self.pg_collection,
        )
        if post_process:
            self.output_layer = column_parallel(config, config.hidden_size, config.padded_text_vocab_size(),
                                                config.init_method)
            init = normal_init(config.init_method_std)
            self.vision_output_layer = ReplicatedLinear(
                config, config.hidden_size, self.vocab.num_codebooks * self.vocab.vision_vocab_size, init
            )
            # HF's `vision_hidden_placeholder` (used only by the unreleased "2d" head): kept so checkpoints and
            # parameter counts match the reference; it gets an exact zero gradient so DDP buckets stay complete.
            device = param_device(config)
            self.vision_hidden_placeholder = torch.nn.Parameter(
                torch.empty(config.hidden_size, dtype=config.params_dtype, device=device)
            )
            if config.perform_initialization:
                with torch.no_grad():
                    init(self.vision_hidden_placeholder)
        self.setup_embeddings_and_output_layer()

    # -- pipeline plumbing --------------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous stage's hidden states (megatron-core schedules call this)."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "LibraModel expects one input tensor per stage"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def build_routing(
        self, vision_indices: Tensor, position_ids: Tensor, segment_ids: Optional[Tensor] = None
    ) -> ModalityRouting:
        """Routing + rotary tables of one micro-batch (what every layer of this stage shares); see micro_batch.py."""
        return build_micro_batch_routing(self.config, vision_indices, position_ids, segment_ids)

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Optional[Tensor],
        vision_indices: Tensor,
        position_ids: Tensor,
        labels: Optional[Tensor] = None,
        clip_features: Optional[Tensor] = None,
        segment_ids: Optional[Tensor] = None,
        routing: Optional[ModalityRouting] = None,
        kv_cache: Optional[LibraKVCache] = None,
    ) -> Tensor:
        """See the module docstring. ``routing``: the micro-batch's routing, built (and its inputs validated) once
        by :func:`~libra_megatron.model.micro_batch.build_micro_batch_routing` for all chunks, stages and the loss;
        without it this call builds its own and validates the inputs it sees. ``kv_cache``: incremental decoding
        (kv_cache.py): the first call over a layer fills the cache with the prompt, later calls feed new text
        positions only."""
        if self.pre_process and tokens is None:
            raise ValueError("the first pipeline stage needs `tokens`")
        if routing is None:
            routing = build_micro_batch_routing(
                self.config, vision_indices, position_ids, segment_ids,
                tokens=tokens if self.pre_process else None, labels=labels if self.post_process else None)
        if kv_cache is not None:
            routing.kv_cache = kv_cache
        hidden = None
        if self.pre_process:
            hidden = self.embedding(tokens, routing, clip_features)
            hidden = sequence_parallel_scatter(hidden, self.config)
        hidden = self.decoder(hidden, routing)
        if not self.post_process:
            return hidden
        return self._postprocess(hidden, routing, labels)

    def _postprocess(self, hidden: Tensor, routing: ModalityRouting, labels: Optional[Tensor]):
        norm = self.decoder.final_layernorm
        rows = hidden.reshape(routing.local_rows, -1)  # the sorted stream (this rank's chunk under SP)
        hidden_text, hidden_vision = norm(*rows.split([routing.local_text_rows,
                                                       routing.local_rows - routing.local_text_rows]))
        plan = routing.full
        if bool(self.config.sequence_parallel) and parallel_state.get_tensor_model_parallel_world_size() > 1:
            full = gather_from_sequence_parallel_region(torch.cat([hidden_text, hidden_vision]),
                                                        tensor_parallel_output_grad=False)
            hidden_text, hidden_vision = full.split([plan.num_text, plan.num_vision])
        vocab_start = parallel_state.get_tensor_model_parallel_rank() * self.output_layer.output_size_per_partition
        s, b = routing.seq_length, routing.batch
        if labels is None:
            text_rows, vision_rows = unified_logits(
                hidden_text, hidden_vision, self.output_layer.weight, self.vision_output_layer.weight, vocab_start,
                self.vocab,
            )
            planes = [plan.unsort(torch.cat([t, v])) for t, v in zip(text_rows, vision_rows)]
            return torch.stack(planes).view(len(planes), s, b, -1).transpose(1, 2)
        # [s, b, C]: the plan flattens the sequence layout itself (a pre-flattened [s*b, C] is ambiguous at b = C = 1)
        labels_text, labels_vision = plan.split_constant(labels.to(hidden.device).permute(2, 1, 0))
        loss_t, loss_v = position_losses(
            hidden_text, hidden_vision, labels_text[:, 0], labels_vision, self.output_layer.weight,
            self.vision_output_layer.weight, vocab_start, self.vocab,
        )
        loss = plan.unsort(torch.cat([loss_t, loss_v])).view(s, b).t()  # back to sequence order, once
        return loss + 0.0 * self.vision_hidden_placeholder.sum()

    # -- training stages ----------------------------------------------------------------------------------------
    def set_training_stage(self, stage: str) -> None:
        """``pretrain``: train exactly the parameters whose HF Libra names contain "vision"; ``instruct``: all."""
        for name, param in self.named_parameters():
            param.requires_grad_(is_trainable_in_stage(name, stage))
