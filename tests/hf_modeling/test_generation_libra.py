"""Two-plane generation (docs/architecture.md#generation, docs/architecture.md#reference-defects (B5)): cache vs no cache, processors per plane against transformers' own 2-D
processors, sampling reproducibility, the forced newline after <eoi>, and beam search (K=1 = greedy; exact search
on a short horizon)."""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from libra_megatron.hf_modeling.generation_libra import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    force_newline,
    infer_vision_indices,
)
from tests.hf_modeling.tiny import EOI, IMAGE_LEN, NEWLINE, TEXT_VOCAB, VISION_VOCAB, mixed_batch, tiny_model

V = TEXT_VOCAB + VISION_VOCAB


def _image_prompt(batch: int = 2):
    """Prompts ending two patches into an image: generation runs through patches, <eoi>, the forced \\n, then text."""
    return mixed_batch(seed=3, batch=batch, trailing_image_patches=2)


def test_processors_act_per_plane_like_transformers_on_each_plane():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, V, generator=g) * 3
    ids = torch.randint(0, V, (2, 3, 7), generator=g)
    for c in range(2):  # transformers' 2-D processors applied to each plane separately are the reference
        want = RepetitionPenaltyLogitsProcessor(1.3)(ids[c], scores[c].clone())
        assert torch.allclose(apply_repetition_penalty(scores, ids, 1.3)[c], want)
        assert torch.equal(apply_top_k(scores, 5)[c], TopKLogitsWarper(5)(ids[c], scores[c].clone()))
        assert torch.equal(apply_top_p(scores, 0.7)[c], TopPLogitsWarper(0.7)(ids[c], scores[c].clone()))
    # masked-out (padding) positions do not count as "already generated"
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[:, :3] = 0
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids[0, :, 3:], scores[0].clone())
    assert torch.allclose(apply_repetition_penalty(scores, ids, 1.3, mask)[0], want)


def test_forced_newline_has_no_nan_and_only_newline():
    scores = torch.randn(2, 3, V)
    forced = force_newline(scores, torch.tensor([False, True, False]), NEWLINE)
    assert torch.equal(forced[:, 0], scores[:, 0])
    probs = forced[:, 1].softmax(-1)
    assert not torch.isnan(probs).any() and torch.all(probs[:, NEWLINE] == 1)


def test_greedy_with_and_without_cache_gives_identical_tokens():
    model = tiny_model()
    ids, vi, signal = _image_prompt()
    mask = torch.ones(vi.shape, dtype=torch.long)
    mask[1, :2] = 0  # left padding on row 1
    kwargs = dict(vision_indices=vi, contiguous_signal=signal, attention_mask=mask, max_new_tokens=8, eos_token_id=[],
                  return_dict_in_generate=True)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    new, new_vi = cached.sequences[..., ids.shape[-1]:], cached.vision_indices[:, ids.shape[-1]:]
    # patches 3, 4 and <eoi> slot are image positions (one code per codebook), then "\n" is forced, then text
    assert new_vi[:, :3].tolist() == [[3, 4, 5]] * 2 and (new_vi[:, 3:] == IMAGE_LEN).all()
    assert (new[:, :, :3] >= TEXT_VOCAB).all() and (new[:, :, 3] == NEWLINE).all()
    assert torch.equal(new[0, :, 3:], new[1, :, 3:]) and (new[:, :, 3:] < TEXT_VOCAB).all()


def test_sampling_is_reproducible_and_respects_top_k_and_top_p_on_both_planes():
    model = tiny_model()
    ids, vi, signal = _image_prompt()
    kwargs = dict(vision_indices=vi, contiguous_signal=signal, max_new_tokens=7, do_sample=True, eos_token_id=[],
                  return_dict_in_generate=True, output_scores=True, temperature=0.8)
    torch.manual_seed(11)
    first = model.generate(ids, top_k=3, **kwargs)
    torch.manual_seed(11)
    again = model.generate(ids, top_k=3, **kwargs)
    assert torch.equal(first.sequences, again.sequences)
    torch.manual_seed(11)
    nucleus = model.generate(ids, top_k=0, top_p=0.5, **kwargs)
    for out, k in ((first, 3), (nucleus, None)):
        new = out.sequences[..., ids.shape[-1]:]
        for step, scores in enumerate(out.scores):  # processed scores [C, B, V]
            chosen = scores.gather(-1, new[:, :, step:step + 1])
            assert torch.isfinite(chosen).all(), "a token outside the kept set was drawn"
            kept = torch.isfinite(scores).sum(-1)
            if k is not None:
                assert (kept <= k).all()
        # the image steps are drawn per codebook: the two planes differ somewhere, text steps agree
        assert not torch.equal(new[0, :, :3], new[1, :, :3])
        assert torch.equal(new[0, :, 3:], new[1, :, 3:])
    # top-p keeps the smallest set whose probability reaches p, per plane, for image steps too
    raw = model.generate(ids, vision_indices=vi, contiguous_signal=signal, max_new_tokens=1, eos_token_id=[],
                         return_dict_in_generate=True, output_scores=True).scores[0] / 0.8
    kept_p = torch.isfinite(nucleus.scores[0])
    probs = raw.softmax(-1)
    for c, b in itertools.product(range(2), range(2)):
        mass = probs[c, b][kept_p[c, b]].sum()
        smallest = probs[c, b][kept_p[c, b]].min()
        assert mass >= 0.5 - 1e-6 and mass - smallest < 0.5 + 1e-6


def test_sampling_after_eoi_forces_newline_without_nan():
    model = tiny_model()
    ids, vi, signal = mixed_batch(seed=4, batch=1)
    prompt = ids[..., :9]  # ends with <eoi>
    assert int(prompt[0, 0, -1]) == EOI
    torch.manual_seed(0)
    out = model.generate(prompt, vision_indices=vi[:, :9], contiguous_signal=signal[:, :9], max_new_tokens=2,
                         do_sample=True, eos_token_id=[])
    assert (out[:, :, 9] == NEWLINE).all()


def test_beam_search_with_one_beam_is_greedy():
    model = tiny_model()
    ids, vi, signal = _image_prompt()
    kwargs = dict(vision_indices=vi, contiguous_signal=signal, max_new_tokens=6, eos_token_id=[])
    greedy = model.generate(ids, **kwargs)
    beam = model.generate(ids, num_beams=1, **kwargs)
    from libra_megatron.hf_modeling.generation_libra import _beam_search, _DecodeState  # the beam path itself, K=1

    state = _DecodeState(model, ids.clone(), vi, torch.ones(vi.shape, dtype=torch.long), signal, True)
    opts = dict(max_new_tokens=6, min_new_tokens=0, do_sample=False, repetition_penalty=1.0, num_beams=1,
                length_penalty=1.0, early_stopping=False, eos=[], pad=0)
    beam_path, _ = _beam_search(state, ids.shape[1], opts)
    assert torch.equal(beam, greedy) and torch.equal(beam_path, greedy)
    # with an end-of-sequence token: K=1 stops where greedy stops
    eos = int(greedy[0, 0, -2])  # the first free text token after the forced newline
    greedy_eos = model.generate(ids[:, :1], vision_indices=vi[:1], contiguous_signal=signal[:1], max_new_tokens=6,
                                eos_token_id=eos)
    beam_eos = model.generate(ids[:, :1], vision_indices=vi[:1], contiguous_signal=signal[:1], max_new_tokens=6,
                              eos_token_id=eos, num_beams=1)
    assert greedy_eos.shape[-1] == ids.shape[-1] + 5 and torch.equal(greedy_eos, beam_eos)


def test_beam_search_is_exact_when_beams_cover_the_vocabulary():
    """Two text steps with K >= V: beam search must return the argmax over all V^2 continuations."""
    model = tiny_model(vocab_size=16)
    prompt = torch.tensor([[1, 5, 7]])
    best = model.generate(prompt, max_new_tokens=2, num_beams=16, length_penalty=0.0, eos_token_id=[])
    grid = torch.cartesian_prod(torch.arange(16), torch.arange(16))
    seqs = torch.cat([prompt.expand(grid.shape[0], -1), grid], dim=1)
    with torch.no_grad():
        logp = model(seqs).logits[0, :, :, :16].log_softmax(-1)
    score = logp[:, 2].gather(1, seqs[:, 3:4]).squeeze(1) + logp[:, 3].gather(1, seqs[:, 4:5]).squeeze(1)
    assert best.tolist() == [seqs[int(score.argmax())].tolist()]


def test_beam_search_on_images_yields_code_pairs():
    model = tiny_model()
    ids, vi, signal = _image_prompt(batch=1)
    out = model.generate(ids, vision_indices=vi, contiguous_signal=signal, max_new_tokens=5, num_beams=3,
                         eos_token_id=[], return_dict_in_generate=True)
    new = out.sequences[..., ids.shape[-1]:]
    assert (new[:, :, :3] >= TEXT_VOCAB).all() and (new[:, :, 3] == NEWLINE).all()
    assert out.vision_indices[0, ids.shape[-1]:].tolist() == [3, 4, 5, IMAGE_LEN, IMAGE_LEN]


def test_vision_indices_are_inferred_and_bad_arguments_rejected():
    ids, vi, _ = mixed_batch(trailing_image_patches=2)
    assert torch.equal(infer_vision_indices(ids[0], TEXT_VOCAB, VISION_VOCAB, IMAGE_LEN), vi)
    model = tiny_model()
    with pytest.raises(TypeError, match="unsupported"):
        model.generate(ids, vision_indices=vi, max_new_tokens=2, typical_p=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, vision_indices=vi, max_length=3)
