"""Output side (docs/architecture.md#output-heads, docs/architecture.md#loss): vocab-parallel text head, two codebook heads, and the Libra loss.

The reference builds logits ``[C, B, L, T+K+2]`` with −inf blocks and averages the per-plane CE. Exactly the
same value, without that tensor:

* text row t:   ``CE_text(t)`` over the T text classes (vocab-parallel; padded vocab columns masked to −inf);
* vision row t: ``½ Σ_c CE_c(t)``, each over the K+2 classes of head c (replicated, ``[n_v, C·(K+2)]`` logits);
* ignored (label −100): 0.

``loss = Σ_t loss(t) / N_valid`` with N_valid the positions whose label is not −100 — which is the reference's
``(1/C) Σ_c CE_mean_c`` because every plane shares the ignore pattern (checked).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from torch import Tensor

from libra_megatron.model.routing import ModalityRouting, vision_flag
from libra_megatron.ops.wgrad_accum import linear
from libra_megatron.vocab import IGNORE_INDEX, LibraVocab


def _text_logits(hidden: Tensor, weight: Tensor, vocab_start: int, text_vocab: int) -> Tensor:
    """This rank's vocab shard of the text logits (fp32), padded ids masked to −inf."""
    logits = linear(copy_to_tensor_model_parallel_region(hidden), weight).float()
    first_padded = text_vocab - vocab_start
    if first_padded < logits.shape[-1]:
        column = torch.arange(logits.shape[-1], device=logits.device)
        logits = logits.masked_fill(column >= first_padded, float("-inf"))
    return logits


def position_losses(
    hidden_text: Tensor, hidden_vision: Tensor, labels_text: Tensor, labels_vision: Tensor, output_weight: Tensor,
    vision_weight: Tensor, vocab_start: int, vocab: LibraVocab,
) -> Tuple[Tensor, Tensor]:
    """Per-row losses (fp32): text rows ``[n_t]`` and vision rows ``[n_v]`` (0 where the label is ignored).

    ``labels_text`` is ``[n_t]`` (plane 0), ``labels_vision`` is ``[n_v, C]`` in model-space ids.
    """
    logits = _text_logits(hidden_text, output_weight, vocab_start, vocab.text_vocab_size)
    valid_t = labels_text != IGNORE_INDEX
    target = torch.where(valid_t, labels_text, torch.zeros_like(labels_text))
    loss_t = vocab_parallel_cross_entropy(logits.unsqueeze(1), target.unsqueeze(1)).squeeze(1)
    loss_t = loss_t * valid_t

    K2, C = vocab.vision_vocab_size, vocab.num_codebooks
    vision_logits = linear(hidden_vision, vision_weight).float().view(-1, C, K2)
    valid_v = labels_vision != IGNORE_INDEX
    target_v = torch.where(valid_v, labels_vision - vocab.image_offset, torch.full_like(labels_vision, IGNORE_INDEX))
    ce = F.cross_entropy(vision_logits.reshape(-1, K2), target_v.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="none").view(-1, C)
    return loss_t, ce.mean(dim=1)


def unified_logits(
    hidden_text: Tensor, hidden_vision: Tensor, output_weight: Tensor, vision_weight: Tensor, vocab_start: int,
    vocab: LibraVocab,
) -> Tuple[Tensor, Tensor]:
    """Rows of the reference's unified logits, one row per position and plane: ``[C, n_t, V]`` and ``[C, n_v, V]``.

    For inference and parity checks (V = T + K + 2; −inf outside the row's own block); gathers the vocab shards.
    """
    T, C, K2 = vocab.text_vocab_size, vocab.num_codebooks, vocab.vision_vocab_size
    text = gather_from_tensor_model_parallel_region(_text_logits(hidden_text, output_weight, vocab_start, T))[:, :T]
    text_rows = torch.cat([text, text.new_full((text.shape[0], K2), float("-inf"))], dim=-1)
    vision = linear(hidden_vision, vision_weight).float().view(-1, C, K2).transpose(0, 1)  # [C, n_v, K2]
    vision_rows = torch.cat([vision.new_full((C, vision.shape[1], T), float("-inf")), vision], dim=-1)
    return text_rows.unsqueeze(0).expand(C, -1, -1), vision_rows


def libra_loss_reduction(
    per_position_loss: Tensor, labels: Tensor, vision_indices: Tensor, vocab: LibraVocab, *,
    routing: Optional[ModalityRouting] = None, image_loss_weight: float = 1.0,
) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """What a megatron ``loss_func`` returns: ``(loss_sum, num_tokens, report)`` for the Libra per-position loss.

    ``per_position_loss`` is the model output ``[B, L]``; ``report`` holds 2-element tensors ``[sum, count]`` for
    ``lm loss``, ``text loss`` and ``image loss`` (Megatron's reporting format; reduce over DP before dividing).
    ``routing``: the micro-batch's routing, whose device flag is used instead of recomputing it from
    ``vision_indices``. ``image_loss_weight != 1`` weighs image positions in the optimised sum (an ablation knob,
    docs/architecture.md#loss-weighting); the report stays unweighted.
    """
    device = per_position_loss.device
    vision = routing.vision_mask if routing is not None else vision_flag(vision_indices.to(device), vocab)
    valid = (labels[0] != IGNORE_INDEX).to(device)
    loss = per_position_loss.float()
    total = loss.sum()
    num_tokens = valid.sum().to(torch.int)
    vision_sum = (loss * vision).sum()
    text_sum = (loss * ~vision).sum()
    vision_count = (valid & vision).sum()
    report = {
        "lm loss": torch.stack([total.detach(), num_tokens.float()]),
        "text loss": torch.stack([text_sum.detach(), (num_tokens - vision_count).float()]),
        "image loss": torch.stack([vision_sum.detach(), vision_count.float()]),
    }
    if image_loss_weight != 1.0:
        total = text_sum + image_loss_weight * vision_sum
    return total, num_tokens, report
