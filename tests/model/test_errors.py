"""Bad input gets a clear error naming the field: ids out of range, image spans that are not 578 long, CLIP features
of the wrong shape, labels for the wrong head, a sequence length that sequence parallelism cannot split."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.model.helpers import make_batch


def _bad_batches() -> dict:
    cases = {}

    def case(name, **changes):
        batch = make_batch("image_mid")
        for key, fn in changes.items():
            fn(batch)
        cases[name] = batch

    case("text_id_too_big", tokens=lambda b: b["tokens"][:, 1, 2].fill_(512))
    case("negative_id", tokens=lambda b: b["tokens"][:, 0, 0].fill_(-3))
    case("planes_disagree", tokens=lambda b: b["tokens"][1, 0, 1].fill_(7))
    case("code_out_of_range", tokens=lambda b: b["tokens"][0, 0, 100].fill_(512 + 600))
    case("boi_missing", tokens=lambda b: b["tokens"][:, 1, 5].fill_(512 + 3))
    case("image_truncated", vision_indices=lambda b: b["vision_indices"][0, 300:583].fill_(578))
    case("image_not_starting_at_boi", vision_indices=lambda b: b["vision_indices"][1, 5].fill_(578))
    case("vision_index_out_of_range", vision_indices=lambda b: b["vision_indices"][1, 2].fill_(600))
    case("too_few_clip_features", clip_features=lambda b: b.__setitem__("clip_features", b["clip_features"][:1]))
    case("wrong_clip_width", clip_features=lambda b: b.__setitem__("clip_features", torch.zeros(2, 576, 64)))
    case("wrong_clip_patches", clip_features=lambda b: b.__setitem__("clip_features", torch.zeros(2, 575, 128)))
    case("text_label_is_image_id", labels=lambda b: b["labels"][:, 0, 1].fill_(512 + 4))
    case("image_label_is_text_id", labels=lambda b: b["labels"][:, 0, 100].fill_(17))
    case("planes_ignore_differently", labels=lambda b: b["labels"][1, 0, 100].fill_(-100))
    case("tokens_wrong_shape", tokens=lambda b: b.__setitem__("tokens", b["tokens"][:1]))
    image_cut = make_batch("image_mid")
    for key in ("tokens", "labels"):
        image_cut[key] = image_cut[key][:, :, :300]
    for key in ("vision_indices", "position_ids", "attention_mask"):
        image_cut[key] = image_cut[key][:, :300]
    cases["image_cut_by_sequence_end"] = image_cut
    return cases


EXPECTED = {
    "text_id_too_big": r"tokens\[\d, 1, 2\] = 512: text ids must lie in \[0, 512\)",
    "negative_id": r"tokens\[0, 0, 0\] = -3: text ids",
    "planes_disagree": r"tokens\[1, 0, 1\] = 7: text positions must hold the same id in every plane",
    "code_out_of_range": r"tokens\[0, 0, 100\] = 1112: image patch ids must lie in \[512, 1024\)",
    "boi_missing": r"tokens\[\d, 1, 5\] = 515: <boi> positions",
    "image_truncated": r"vision_indices: the image span around batch row 0, position \d+ is not a complete 578-position image",
    "image_not_starting_at_boi": r"vision_indices: the image span around batch row 1, position 6",
    "vision_index_out_of_range": r"vision_indices\[1, 2\] = 600 is outside \[0, 578\]",
    "too_few_clip_features": r"clip_features must be \[N_images, 576, 128\] = \[2, 576, 128\].*got \[1, 576, 128\]",
    "wrong_clip_width": r"clip_features must be .*got \[2, 576, 64\]",
    "wrong_clip_patches": r"clip_features must be .*got \[2, 575, 128\]",
    "text_label_is_image_id": r"labels\[\d, 0, 1\] = 516: labels at text positions must be -100 or a text id",
    "image_label_is_text_id": r"labels\[\d, 0, 100\] = 17: labels at image positions must be -100 or an image id",
    "planes_ignore_differently": r"labels\[1, 0, 100\] = -100: every plane must ignore \(-100\) the same positions",
    "tokens_wrong_shape": r"tokens must be \[2, B, L\] matching vision_indices \[2, 598\], got \[1, 2, 598\]",
    "image_cut_by_sequence_end": r"vision_indices: the image span around batch row \d, position 299",
}


def _errors_from_model() -> dict:
    from tests.model.helpers import build_model, model_inputs, tiny_config

    model = build_model(tiny_config())
    messages = {}
    for name, batch in _bad_batches().items():
        try:
            model(**model_inputs(batch))
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


def _sequence_parallel_error() -> str:
    from tests.model.helpers import build_model, model_inputs, tiny_config

    model = build_model(tiny_config(sequence_parallel=True))
    batch = make_batch("image_mid")
    for key in ("tokens", "labels"):
        batch[key] = batch[key][:, :, :597]
    for key in ("vision_indices", "position_ids"):
        batch[key] = batch[key][:, :597]
    try:
        model(**model_inputs(batch))
    except ValueError as error:
        return str(error)
    return ""


def test_bad_inputs_raise_clear_errors() -> None:
    (messages,) = run_on_ranks(_errors_from_model, world_size=1)
    for name, pattern in EXPECTED.items():
        assert messages[name] is not None, f"{name}: no error raised"
        assert __import__("re").search(pattern, messages[name]), f"{name}: unexpected message {messages[name]!r}"


def test_sequence_length_not_divisible_by_tp_under_sequence_parallel() -> None:
    messages = run_on_ranks(_sequence_parallel_error, world_size=2, tp=2)
    for message in messages:
        assert "sequence length 597 is not divisible by the tensor-parallel size 2" in message


def test_routing_rejects_bad_vision_indices_without_megatron() -> None:
    from libra_megatron.model.routing import ModalityRouting
    from libra_megatron.vocab import LibraVocab

    vi = make_batch("image_mid")["vision_indices"]
    vi[0, 10] = 3
    with pytest.raises(ValueError, match="not a complete 578-position image"):
        ModalityRouting.build(vi, LibraVocab(text_vocab_size=512))
    with pytest.raises(ValueError, match="must be \\[B, L\\]"):
        ModalityRouting.build(vi[0], LibraVocab(text_vocab_size=512))
