"""Metrics: the caption scores are pycocoevalcap's own (fixed strings), the VQA normalisation passes the standard
cases, VQA accuracy follows the official leave-one-out formula, choices are parsed from free text."""
from __future__ import annotations

import pytest

from libra_megatron.evaluation.answer_normalization import normalize_answer
from libra_megatron.evaluation.scoring import (
    extract_choice,
    java_available,
    score_captions,
    simple_tokenize,
    vqa_accuracy,
)

REFS = {
    "1": ["A dog runs across the green grass.", "a brown dog running on a lawn", "The dog is running outside."],
    "2": ["Two cats sleep on a bed.", "cats sleeping on the bed", "two kittens lying on a blanket"],
    "3": ["A red bus on the street.", "a bus driving down a city road", "red double-decker bus in traffic"],
}
PREDS = {"1": "A dog running on the grass.", "2": "a cat sleeping on a bed", "3": "a red bus on a road"}


def test_caption_scores_are_pycocoevalcaps_scorers_on_fixed_strings():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    # tokenised by hand exactly as simple_tokenize must (lower case, punctuation dropped)
    gts = {"1": ["a dog runs across the green grass", "a brown dog running on a lawn", "the dog is running outside"],
           "2": ["two cats sleep on a bed", "cats sleeping on the bed", "two kittens lying on a blanket"],
           "3": ["a red bus on the street", "a bus driving down a city road", "red double-decker bus in traffic"]}
    res = {"1": ["a dog running on the grass"], "2": ["a cat sleeping on a bed"], "3": ["a red bus on a road"]}
    assert simple_tokenize(REFS) == gts
    scores, notes = score_captions(REFS, PREDS, metrics=("cider", "bleu"), tokenizer="simple")
    want_cider = Cider().compute_score(gts, res)[0]
    want_bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert scores["CIDEr"] == pytest.approx(want_cider, abs=1e-12) and 0.0 < scores["CIDEr"] < 10.0
    assert [scores[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(want_bleu, abs=1e-12)
    assert notes["tokenizer"] == "simple" and "METEOR" not in scores
    perfect, _ = score_captions({"1": ["a b c d e"], "2": ["f g h i j"]}, {"1": "a b c d e", "2": "f g h i j"},
                                metrics=("bleu",), tokenizer="simple")
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(not java_available(), reason="PTBTokenizer needs Java")
def test_ptb_tokenizer_path_matches_the_library_pipeline():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    scores, notes = score_captions(REFS, PREDS, metrics=("cider",), tokenizer="ptb")
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in PREDS.items()})
    assert scores["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert notes["tokenizer"].startswith("ptb")


def test_meteor_and_spice_are_skipped_with_a_reason_without_java(monkeypatch):
    import libra_megatron.evaluation.scoring as scoring

    monkeypatch.setattr(scoring, "java_available", lambda: False)
    scores, notes = scoring.score_captions(REFS, PREDS)
    assert set(scores) == {"CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
    assert "Java" in notes["METEOR"] and "Java" in notes["SPICE"] and notes["tokenizer"] == "simple"
    with pytest.raises(ValueError, match="without reference"):
        scoring.score_captions({"1": ["x"]}, {"2": "x"}, metrics=("cider",))


@pytest.mark.parametrize("raw, want", [
    ("Two", "2"), ("the dog", "dog"), ("A  Dog.", "dog"), ("an apple", "apple"), ("dont", "don't"),
    ("isnt it", "isn't it"), ("yes!", "yes"), ("10,000", "10000"), ("3.5", "3.5"), ("red, white", "red white"),
    ("man's hat", "man 's hat"), ("left-hand", "left hand"), ("  none \n", "0"), ("It's", "it 's"),
])
def test_vqa_answer_normalisation_standard_cases(raw, want):
    assert normalize_answer(raw) == want


def test_vqa_accuracy_is_min_matches_over_three_leave_one_out():
    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", ten) == pytest.approx(0.9)   # official: 3 matches -> 0.9
    assert vqa_accuracy("3", ten) == 1.0
    assert vqa_accuracy("4", ten) == 0.0
    assert vqa_accuracy("2", ["2"] + ["x"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("The Cat.", ["cat"]) == 1.0


@pytest.mark.parametrize("text, options, want", [
    ("B", ["red", "blue", "green"], "B"), ("(C) green", ["red", "blue", "green"], "C"),
    ("Answer: a", ["red", "blue"], "A"), ("blue", ["red", "blue"], "B"), ("it is blue.", ["red", "blue"], "B"),
    ("purple", ["red", "blue"], None), ("Yes, there is a dog.", None, "yes"), ("No", None, "no"), ("maybe", None, None),
    # an option's own text wins over a leading article read as a letter; a bare letter is upper case and ends
    ("a red car", ["blue car", "a red car"], "B"), ("A cat.", ["dog", "cat"], "B"), ("A.", ["dog", "cat"], "A"),
    ("B) cat", ["dog", "cat"], "B"), ("The answer is B because", ["dog", "cat"], "B"),
    ("answer is a cat", ["dog", "cat"], "B"), ("a", ["dog", "cat"], None), ("C", ["dog", "cat"], None),
])
def test_choice_extraction(text, options, want):
    assert extract_choice(text, options) == want
