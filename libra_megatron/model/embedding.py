"""Input side (docs/architecture.md#input-embedding): vocab-parallel text embedding for text rows, the hybrid image input for vision rows.

Vision row p (plane ids ``id_c = tokens[c] - T`` in 0..513, CLIP feature ``f_p``, zeros for <boi>/<eoi>)::

    e_p = W_sig · RMSNorm_{h+F}( [E_0[id_0] ‖ E_1[id_1] ‖ f_p] )        # 8192 → 4096 at 7B

The two codebook tables are one replicated weight ``[C·(K+2), h/C]`` (plane c at row offset c·(K+2)), the norm
and the processor are replicated (the processor is 33.5M params at 7B; sharding it would add an all-gather on
every image row). Only the text rows touch the vocab-parallel table, so its all-reduce is ``n_text × h``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from libra_megatron.config import LibraConfig
from libra_megatron.model.routed_linear import ReplicatedLinear, normal_init, param_device
from libra_megatron.model.routed_norm import rms_norm
from libra_megatron.model.routing import ModalityRouting


class LibraEmbedding(MegatronModule):
    """tokens ``[C, B, L]`` (+ CLIP features) → embeddings ``[s, b, h]`` (complete on all TP ranks) whose rows are the
    modality-sorted stream: the text rows, then the vision rows (routing.py)."""

    def __init__(self, config: LibraConfig) -> None:
        super().__init__(config=config)
        vocab = config.vocab
        self.vocab = vocab
        init = normal_init(config.init_method_std)
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_text_vocab_size(), config.hidden_size, init_method=config.init_method, config=config
        )
        self.vision_embeddings = ReplicatedLinear(
            config, config.vision_embedding_size, vocab.num_codebooks * vocab.vision_vocab_size, init
        )
        device = param_device(config)
        self.vision_signal_norm_weight = torch.nn.Parameter(
            torch.ones(config.signal_size, dtype=config.params_dtype, device=device)
        )
        self.vision_signal_processor = ReplicatedLinear(config, config.signal_size, config.hidden_size, init)
        self.eps = config.layernorm_epsilon
        start = self.word_embeddings.vocab_start_index
        if start <= vocab.pad_id < self.word_embeddings.vocab_end_index:
            # HF's nn.Embedding(padding_idx=0): the pad row never receives a gradient
            pad_row = vocab.pad_id - start
            self.word_embeddings.weight.register_hook(lambda grad: grad.index_fill(0, grad.new_tensor([pad_row], dtype=torch.long), 0.0))

    def forward(self, tokens: Tensor, routing: ModalityRouting, clip_features: Optional[Tensor]) -> Tensor:
        vocab, plan = self.vocab, routing.full
        ids = tokens.permute(2, 1, 0).reshape(-1, tokens.shape[0])  # [s*b, C]
        ids_text, ids_vision = plan.split_constant(ids)
        text = self.word_embeddings(ids_text[:, 0])
        offsets = torch.arange(vocab.num_codebooks, device=ids.device) * vocab.vision_vocab_size
        codes = ids_vision - vocab.image_offset + offsets
        discrete = F.embedding(codes, self.vision_embeddings.weight).flatten(1)  # [n_v, h] = E_0 ‖ E_1
        features = self._clip_rows(clip_features, routing, discrete)
        signal = rms_norm(torch.cat([discrete, features], dim=-1), self.vision_signal_norm_weight, self.eps)
        vision = self.vision_signal_processor(signal)
        return torch.cat([text, vision]).view(routing.seq_length, routing.batch, -1)

    def _clip_rows(self, clip_features: Optional[Tensor], routing: ModalityRouting, like: Tensor) -> Tensor:
        width = self.config.clip_feature_size
        if clip_features is None:  # HF semantics: no continuous signal (e.g. generated image tokens) -> zeros
            return like.new_zeros((like.shape[0], width))
        expected = (routing.num_images, self.vocab.patches_per_image, width)
        if tuple(clip_features.shape) != expected:
            raise ValueError(
                f"clip_features must be [N_images, {self.vocab.patches_per_image}, {width}] = {list(expected)} for this "
                f"micro-batch ({routing.num_images} images in vision_indices), got {list(clip_features.shape)}"
            )
        flat = clip_features.reshape(-1, width).to(like.dtype)
        rows = routing.clip_rows
        if flat.shape[0] == 0:
            return like.new_zeros((like.shape[0], width))
        picked = flat.index_select(0, rows.clamp(min=0))
        return picked.masked_fill((rows < 0).unsqueeze(-1), 0.0)


def sequence_parallel_scatter(embeddings: Tensor, config: LibraConfig) -> Tensor:
    """Keep this rank's ``[s/t, b, h]`` chunk under sequence parallelism (backward all-gathers)."""
    if config.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
        from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

        return scatter_to_sequence_parallel_region(embeddings)
    return embeddings
