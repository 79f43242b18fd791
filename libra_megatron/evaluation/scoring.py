"""Metrics: captioning through ``pycocoevalcap``'s own scorers, VQA accuracy, multiple-choice / yes-no accuracy.

Captioning (the COCO caption evaluation): references and predictions are tokenised by pycocoevalcap's
``PTBTokenizer`` (Stanford PTB tokenizer, lower case, punctuation tokens removed) when Java is installed; without
Java by :func:`simple_tokenize` (lower case, the same punctuation removed, split on spaces and punctuation) and the
summary says which. CIDEr (``Cider``, i.e. CIDEr-D with the IDF of the evaluated references) and BLEU-1..4
(``Bleu(4)``, corpus-level "closest" reference length) always run; METEOR (``Meteor``) and SPICE (``Spice``) need
Java, SPICE also the Stanford CoreNLP models pycocoevalcap downloads on first use: when a requirement is missing the
metric is skipped and the reason recorded. Nothing here re-implements a scorer.

VQA: :func:`vqa_accuracy` is the VQAv2 / TextVQA accuracy: ``min(1, matches / 3)`` against the human answers after
:func:`~libra_megatron.evaluation.answer_normalization.normalize_answer`, averaged over the 10 leave-one-annotator-out
subsets as the official script does (identical to ``min(1, matches/3)`` when all ten annotators are counted
except at 3 or 4 matches, where the official average gives 0.9 / 1.0).

Choice: :func:`extract_choice` reads the option a free-form answer names (the text of exactly one option first,
then a leading upper-case letter ``"B"``, ``"(B)"``, ``"B."`` or one after ``"Answer: "``, then the one option the
answer contains), or ``yes``/``no`` for yes-no questions; accuracy is exact match of that choice.
"""
from __future__ import annotations

import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

from libra_megatron.evaluation.answer_normalization import normalize_answer

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS (tokens dropped after tokenisation)
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}
_SPLIT = re.compile(r"'[A-Za-z]+|[A-Za-z0-9]+(?:[-.][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (PTBTokenizer, METEOR and SPICE run on the JVM)."""
    return shutil.which("java") is not None


def simple_tokenize(captions: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """Java-free stand-in for ``PTBTokenizer().tokenize``: lower case, words and punctuation split, punctuation
    tokens of the PTB list dropped, hyphenated words and ``'s``-style clitics kept as PTB does; same output shape (id -> list of space-joined token strings)."""
    out: Dict[str, List[str]] = {}
    for key, texts in captions.items():
        out[key] = [" ".join(t for t in _SPLIT.findall(text.replace("\n", " ").lower()) if t not in PTB_PUNCTUATION)
                    for text in texts]
    return out


def tokenize_captions(captions: Dict[str, List[str]], tokenizer: str) -> Dict[str, List[str]]:
    """``tokenizer``: ``ptb`` (pycocoevalcap's PTBTokenizer, needs Java) or ``simple``."""
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    if tokenizer == "simple":
        return simple_tokenize(captions)
    raise ValueError(f"unknown caption tokenizer {tokenizer!r} (ptb or simple)")


def _spice_models_missing() -> Optional[str]:
    import os

    import pycocoevalcap.spice.spice as spice_module

    lib = os.path.join(os.path.dirname(os.path.abspath(spice_module.__file__)), "lib")
    if not os.path.isfile(os.path.join(lib, "stanford-corenlp-3.6.0.jar")):
        return (f"SPICE needs the Stanford CoreNLP 3.6.0 jars in {lib} (pycocoevalcap downloads them on first use: "
                "run `python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models; "
                "get_stanford_models()'` once with network access)")
    return None


def score_captions(references: Dict[str, List[str]], predictions: Dict[str, str],
                   metrics: Sequence[str] = ("cider", "bleu", "meteor", "spice"),
                   tokenizer: Optional[str] = None) -> Tuple[Dict[str, float], Dict[str, str]]:
    """COCO caption metrics of ``predictions`` (id -> caption) against ``references`` (id -> captions).

    Returns ``(scores, notes)``: ``scores`` has ``CIDEr``, ``BLEU-1``..``BLEU-4``, ``METEOR``, ``SPICE`` (those that
    ran, on the 0..1 scale of pycocoevalcap; CIDEr is unbounded, ~0..10), ``notes`` the tokenizer used and why a
    requested metric was skipped.
    """
    if not predictions:
        return {}, {"skipped": "no predictions"}
    unknown = sorted(set(metrics) - {"cider", "bleu", "meteor", "spice"})
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown} (cider, bleu, meteor, spice)")
    missing = sorted(k for k in predictions if not references.get(k))
    if missing:
        raise ValueError(f"predictions without reference captions: {missing[:5]}")
    java = java_available()
    tokenizer = tokenizer or ("ptb" if java else "simple")
    notes: Dict[str, str] = {"tokenizer": tokenizer if tokenizer == "simple" else "ptb (pycocoevalcap PTBTokenizer)"}
    keys = sorted(predictions)
    gts = tokenize_captions({k: list(references[k]) for k in keys}, tokenizer)
    res = tokenize_captions({k: [predictions[k]] for k in keys}, tokenizer)
    scores: Dict[str, float] = {}
    if "cider" in metrics:
        from pycocoevalcap.cider.cider import Cider

        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "bleu" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"BLEU-{n + 1}": float(value) for n, value in enumerate(bleu)})
    for name in ("meteor", "spice"):
        if name not in metrics:
            continue
        reason = None if java else f"{name.upper()} skipped: Java is not installed (pycocoevalcap runs it on the JVM)"
        if reason is None and name == "spice":
            reason = _spice_models_missing()
        if reason is not None:
            notes[name.upper()] = reason
            continue
        try:
            if name == "meteor":
                from pycocoevalcap.meteor.meteor import Meteor

                scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
            else:
                from pycocoevalcap.spice.spice import Spice

                scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except Exception as error:  # the JVM side failed (memory, missing model files): keep the other metrics
            notes[name.upper()] = f"{name.upper()} skipped: {type(error).__name__}: {error}"
    return scores, notes


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2/TextVQA accuracy of one prediction against its human answers (see the module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


# A bare option letter is upper case and ends at ")", ".", ":", "," or the end ("B", "(B)", "B.", "C) green");
# after an explicit "Answer:" / "the answer is" it may also be followed by a space ("Answer: B because ..."), and
# a lower-case letter counts there when nothing follows it ("Answer: b"). "a red car" names no letter.
_ANSWER_PREFIX = re.compile(r"\s*(?:the\s+)?answer(?:\s*[:：]|\s+is\b\s*:?)\s*", re.IGNORECASE)
_LETTER = re.compile(r"\s*\(?([A-Z])(?:[).:,]|$)")
_LETTER_AFTER_ANSWER = re.compile(r"\(?(?:([A-Z])(?:[).:,]|\s|$)|([a-z])(?:[).:,]|$))")


def _letter(text: str) -> Optional[str]:
    """The option letter ``text`` starts with (see above), upper case, or ``None``."""
    prefix = _ANSWER_PREFIX.match(text)
    match = _LETTER_AFTER_ANSWER.match(text, prefix.end()) if prefix else _LETTER.match(text)
    if match is None:
        return None
    return (match.group(1) or match.group(2) or "").upper() if prefix else match.group(1)


def extract_choice(text: str, options: Optional[Sequence[str]]) -> Optional[str]:
    """The choice a generated answer makes: an option letter (``"A"``..) when ``options`` is given, else
    ``"yes"``/``"no"``; ``None`` when it names none (counted wrong). With options: the text of exactly one option
    first, then a leading letter (upper case: ``"B"``, ``"(B)"``, ``"B."``; or after ``"Answer:"``), then the one
    option whose text the answer contains."""
    if options:
        letters = [chr(ord("A") + i) for i in range(len(options))]
        said = normalize_answer(text)
        named = [letter for letter, option in zip(letters, options) if said and normalize_answer(option) == said]
        if len(named) == 1:
            return named[0]
        letter = _letter(text)
        if letter in letters:
            return letter
        contained = [letter for letter, option in zip(letters, options)
                     if normalize_answer(option) and re.search(rf"\b{re.escape(normalize_answer(option))}\b", said)]
        return contained[0] if len(contained) == 1 else None
    words = re.findall(r"[a-z]+", text.lower())
    for word in words:
        if word in ("yes", "no"):
            return word
    return None
