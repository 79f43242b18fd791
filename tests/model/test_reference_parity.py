"""The engine (TP=1, PP=1) against the independent eager reference of docs/architecture.md#input-embedding to docs/architecture.md#loss, on several layouts:
unified logits and loss to 1e-6, every gradient to 1e-5 — through both routing plans (segment and index)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.model.helpers import (
    hf_weights,
    make_batch,
    max_relative_error,
    merge_grads,
    model_inputs,
    tiny_sizes,
)
from tests.model.reference import reference_logits, reference_loss_sum

# (layout, packed, force the index routing plan)
CASES: List[Tuple[str, bool, bool]] = [
    ("image_first", False, False),
    ("image_mid", False, False),
    ("bos_image_caption", False, False),
    ("two_images", False, False),
    ("text_only", False, False),
    ("right_padding", False, False),
    ("mixed_offsets", False, False),  # layouts differ -> index plan
    ("single_sample", False, False),
    ("single_sample", False, True),
    ("image_mid", True, False),  # packed samples -> index plan with block-diagonal mask
    ("two_images", False, True),
    ("right_padding", False, True),
]


def _engine_outputs(cases, text_vocab: int, recompute: bool = False) -> List[Dict]:
    from tests.model.helpers import build_model, load_hf, local_grads, tiny_config

    sizes = tiny_sizes(text_vocab)
    weights = hf_weights(sizes)
    models = {}
    results = []
    for layout, packed, force in cases:
        if force not in models:
            extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
            config = tiny_config(text_vocab, force_general_routing=force, **extra)
            model = build_model(config)
            load_hf(model, weights, config)
            calls = [0]
            for layer in model.decoder.layers:
                layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
            models[force] = (model, config, calls)
        model, config, calls = models[force]
        calls[0] = 0
        batch = make_batch(layout, T=text_vocab, packed=packed)
        inputs = model_inputs(batch)
        model.zero_grad()
        loss = model(**inputs)
        routing = model.build_routing(batch["vision_indices"], batch["position_ids"], batch.get("segment_ids"))
        loss.sum().backward()
        with torch.no_grad():
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"})
        no_grad = [name for name, p in model.named_parameters() if p.grad is None]
        results.append(dict(loss=loss.detach(), logits=logits, uniform=routing.uniform, layer_calls=calls[0], no_grad=no_grad,
                            grads=merge_grads([local_grads(model, config)], config)))
    return results


def _reference(batch: dict, weights: Dict[str, torch.Tensor], sizes: dict):
    leaves = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    logits = reference_logits(leaves, sizes, batch["tokens"], batch["vision_indices"], batch["position_ids"],
                              batch["clip_features"], batch["attention_mask"], batch.get("segment_ids"))
    loss = reference_loss_sum(logits, batch["labels"])
    loss.backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    return logits.detach(), loss.detach(), grads


@pytest.fixture(scope="module")
def engine_results():
    return run_on_ranks(_engine_outputs, world_size=1, args=(CASES, 512))[0]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{l}{'-packed' if p else ''}{'-index' if f else ''}" for l, p, f in CASES])
def test_engine_matches_reference(engine_results, index: int) -> None:
    layout, packed, force = CASES[index]
    sizes = tiny_sizes(512)
    batch = make_batch(layout, packed=packed)
    ref_logits, ref_loss, ref_grads = _reference(batch, hf_weights(sizes), sizes)
    got = engine_results[index]
    expect_uniform = not (force or packed or layout == "mixed_offsets")
    assert got["uniform"] == expect_uniform, "wrong routing plan chosen"
    # megatron DDP (overlapped grad reduce) needs the same parameters to get a gradient in every micro-batch
    assert got["no_grad"] == [], f"parameters without a gradient for this layout: {got['no_grad']}"
    real = batch["attention_mask"][None, :, :, None].expand_as(ref_logits)
    assert max_relative_error(got["logits"], ref_logits, real) <= 1e-6
    per_position = got["loss"]
    assert float(abs(per_position.sum() - ref_loss) / ref_loss) <= 1e-6
    assert torch.all(per_position[batch["labels"][0] == -100] == 0)
    assert set(got["grads"]) == set(ref_grads)
    for name, ref in ref_grads.items():
        if ref.abs().max() == 0:
            assert got["grads"][name].abs().max() == 0, name
            continue
        assert max_relative_error(got["grads"][name], ref) <= 1e-5, name


def test_full_recompute_and_padded_vocab_match_reference() -> None:
    """Activation recompute replays every layer with its micro-batch's routing; a text vocab that megatron pads
    (300 -> 384) keeps the padded ids out of the softmax."""
    cases = [("two_images", False, False), ("mixed_offsets", False, False)]
    results = run_on_ranks(_engine_outputs, world_size=1, args=(cases, 300), kwargs=dict(recompute=True))[0]
    sizes = tiny_sizes(300)
    for (layout, packed, _), got in zip(cases, results):
        batch = make_batch(layout, T=300, packed=packed)
        _, ref_loss, ref_grads = _reference(batch, hf_weights(sizes), sizes)
        assert got["layer_calls"] == 2 * 3, "each layer runs in forward, again in backward (recompute), and for logits"
        assert float(abs(got["loss"].sum() - ref_loss) / ref_loss) <= 1e-6
        for name, ref in ref_grads.items():
            if ref.abs().max() > 0:
                assert max_relative_error(got["grads"][name], ref) <= 1e-5, name
