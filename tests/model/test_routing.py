"""libra_megatron/model/routing.py: the row plan splits per-position tables given in sequence layout ``[s, b, C]``
by modality, for any batch and plane count (batch 1 with one plane included: ``[s, 1, 1]`` must stay 2-D)."""
from __future__ import annotations

import torch

from tests.distributed import run_on_ranks

CASES = [(batch, planes, force) for batch in (1, 2) for planes in (1, 2) for force in (False, True)]


def _splits():
    from libra_megatron.model.routing import ModalityRouting
    from tests.model.helpers import make_batch, tiny_config

    vocab = tiny_config(512).vocab
    out = []
    for batch, planes, force_index_plan in CASES:
        vision_indices = make_batch("image_mid", T=512)["vision_indices"][:batch]
        routing = ModalityRouting.build(vision_indices, vocab, force_index_plan=force_index_plan)
        s = vision_indices.shape[1]
        table = torch.arange(s * batch * planes).view(s, batch, planes)  # [s, b, C], each entry unique
        text, vision = routing.full.split_constant(table)
        is_vision = routing.is_vision.t()  # [s, b]
        out.append((tuple(text.shape), tuple(vision.shape), int((~is_vision).sum()), int(is_vision.sum()),
                    sorted(text[:, 0].tolist()) == sorted(table[~is_vision][:, 0].tolist()),
                    sorted(vision[:, 0].tolist()) == sorted(table[is_vision][:, 0].tolist())))
    return out


def test_split_constant_of_a_sequence_layout_table_keeps_the_planes():
    (results,) = run_on_ranks(_splits, world_size=1)
    for (batch, planes, force), (text, vision, n_text, n_vision, text_ok, vision_ok) in zip(CASES, results):
        case = f"batch {batch}, planes {planes}, index plan {force}"
        assert text == (n_text, planes) and vision == (n_vision, planes), case
        assert text_ok and vision_ok, case
