"""What one micro-batch needs before any model chunk runs, built and validated once on the host.

:func:`build_micro_batch_routing` turns ``vision_indices`` / ``segment_ids`` / ``position_ids`` into the
:class:`~libra_megatron.model.routing.ModalityRouting` (row plans, attention segments, CLIP row map, RoPE tables)
and, when ``config.validate_inputs`` is on, checks the image spans, the token ids and the labels against it. The
training data path calls it once per micro-batch (``training/libra_family.py``) and hands the one object to every
model chunk, pipeline stage and the loss; ``LibraModel.forward`` builds it itself only when called without one
(tests, inference). See docs/design.md ("Model", "One routing per micro-batch").
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from megatron.core import parallel_state
from torch import Tensor

from libra_megatron.config import LibraConfig
from libra_megatron.model.rotary import RotaryTables
from libra_megatron.model.routing import ModalityRouting
from libra_megatron.utils.transfer import to_device_async
from libra_megatron.vocab import IGNORE_INDEX, LibraVocab


def build_micro_batch_routing(
    config: LibraConfig, vision_indices: Tensor, position_ids: Tensor, segment_ids: Optional[Tensor] = None, *,
    tokens: Optional[Tensor] = None, labels: Optional[Tensor] = None, device: Optional[torch.device] = None,
) -> ModalityRouting:
    """The routing + RoPE tables of one micro-batch for this rank; validates ``tokens``/``labels`` when given.

    ``device`` defaults to ``position_ids``'s; pass host ``vision_indices``/``segment_ids``/``tokens``/``labels``
    (a device tensor costs a device-to-host copy).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    sp = bool(config.sequence_parallel) and tp > 1
    device = device if device is not None else position_ids.device
    routing = ModalityRouting.build(
        vision_indices, config.vocab, segment_ids=segment_ids, device=device,
        sequence_parallel_size=tp if sp else 1,
        sequence_parallel_rank=parallel_state.get_tensor_model_parallel_rank() if sp else 0,
        force_index_plan=config.force_general_routing, validate=config.validate_inputs,
    )
    if tuple(position_ids.shape) != (routing.batch, routing.seq_length):
        raise ValueError(f"position_ids must be [B, L] = {[routing.batch, routing.seq_length]}, "
                         f"got {list(position_ids.shape)}")
    if config.validate_inputs:
        if tokens is not None:
            check_ids("tokens", tokens, vision_indices, routing.is_vision, config.vocab)
        if labels is not None:
            check_ids("labels", labels, vision_indices, routing.is_vision, config.vocab)
        routing.inputs_checked = tokens is not None and labels is not None
    dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else config.params_dtype
    routing.rotary = RotaryTables.build(to_device_async(position_ids, device),
                                        config.kv_channels, config.rotary_base, dtype)
    return routing


def check_ids(field: str, ids: Tensor, vision_indices: Tensor, is_vision: Tensor, vocab: LibraVocab) -> None:
    """Raise ValueError naming the first ``field[c, b, t]`` whose id does not fit its position (one host sync).

    ``field`` is ``"tokens"`` (model-space input ids: text ids equal in every plane, patch codes, ``<boi>``/``<eoi>``
    where ``vision_indices`` puts them) or ``"labels"`` (-100 or a class of the head serving the position, the
    same ignore pattern in every plane). ``is_vision`` is the routing's flag ``[B, L]``.
    """
    C = vocab.num_codebooks
    if ids.dim() != 3 or ids.shape[0] != C or tuple(ids.shape[1:]) != tuple(vision_indices.shape):
        raise ValueError(f"{field} must be [{C}, B, L] matching vision_indices {list(vision_indices.shape)}, "
                         f"got {list(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{field} must hold integer ids, got dtype {ids.dtype}")
    is_text = ~is_vision.to(ids.device).unsqueeze(0).expand_as(ids)
    T = vocab.text_vocab_size
    checks: List[Tuple[Tensor, str]]
    if field == "labels":
        ignored = ids == IGNORE_INDEX
        checks = [
            (is_text & ~ignored & ((ids < 0) | (ids >= T)),
             f"labels at text positions must be -100 or a text id in [0, {T}) (a text position never predicts an "
             "image id)"),
            (~is_text & ~ignored & ((ids < vocab.image_offset) | (ids >= vocab.total_vocab_size)),
             f"labels at image positions must be -100 or an image id in [{vocab.image_offset}, "
             f"{vocab.total_vocab_size})"),
            (ignored != ignored[:1], "every plane must ignore (-100) the same positions"),
        ]
    else:
        vi = vision_indices.to(ids.device).unsqueeze(0).expand_as(ids)
        patch = (vi >= 1) & (vi <= vocab.patches_per_image)
        codes_end = vocab.image_offset + vocab.codebook_size
        checks = [
            (is_text & ((ids < 0) | (ids >= T)), f"text ids must lie in [0, {T})"),
            ((ids != ids[:1]) & is_text, "text positions must hold the same id in every plane"),
            (patch & ((ids < vocab.image_offset) | (ids >= codes_end)),
             f"image patch ids must lie in [{vocab.image_offset}, {codes_end})"),
            ((vi == 0) & (ids != vocab.boi_id), f"<boi> positions (vision_indices 0) must hold {vocab.boi_id}"),
            ((vi == vocab.image_positions - 1) & (ids != vocab.eoi_id),
             f"<eoi> positions (vision_indices {vocab.image_positions - 1}) must hold {vocab.eoi_id}"),
        ]
    failed = torch.stack([bad.any() for bad, _ in checks]).tolist()
    for (bad, message), is_bad in zip(checks, failed):
        if is_bad:
            c, b, t = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"{field}[{c}, {b}, {t}] = {int(ids[c, b, t])}: {message}")
