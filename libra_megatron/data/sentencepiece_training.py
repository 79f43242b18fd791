"""Train a small LLaMA-style sentencepiece model (tests, the CPU demo): BPE, byte fallback, ids like LLaMA-2.

The trainer settings mirror LLaMA-2's ``tokenizer.model``: ``<unk>``=0, ``<s>``=1, ``</s>``=2, the 256 byte
pieces right after (so ``<0x0A>`` is 13), identity normalisation, whitespace kept as is, split digits.
"""
from __future__ import annotations

import io
import os
import random
from typing import Iterable, List, Optional

import sentencepiece as spm

VICUNA_WORDS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT:"
)
CAPTION_WORDS = (
    "a an the of in on with and at by from to is are two three small large red blue green white black yellow "
    "dog cat man woman child people car bus train street city tree trees grass field water river beach sky "
    "cloud clouds sun house building table chair plate food pizza sandwich cake bowl cup phone laptop bike "
    "horse cow sheep bird birds boat plane kite ball frisbee snow mountain road sign window door wall room "
    "kitchen bathroom bed couch picture photo image standing sitting walking riding holding looking playing "
    "eating near next top front behind inside outside under over what where how many color does is this there "
    "describe the image briefly yes no left right"
).split()


def default_sentences(count: int = 2000, seed: int = 0) -> List[str]:
    """Caption- and dialogue-like English sentences (deterministic in ``seed``)."""
    rng = random.Random(seed)
    sentences = [VICUNA_WORDS] * 20
    for _ in range(count):
        words = [rng.choice(CAPTION_WORDS) for _ in range(rng.randint(3, 14))]
        sentence = " ".join(words)
        if rng.random() < 0.3:
            sentence = sentence.capitalize() + rng.choice([".", "?", "!", ","])
        if rng.random() < 0.1:
            sentence += f" {rng.randint(0, 2024)}"
        sentences.append(sentence)
    return sentences


def train_sentencepiece(
    output_path: str | os.PathLike,
    vocab_size: int = 384,
    sentences: Optional[Iterable[str]] = None,
    seed: int = 0,
) -> str:
    """Train a LLaMA-style BPE model and write it to ``output_path`` (``.model``); return the path."""
    output_path = os.fspath(output_path)
    text = list(sentences) if sentences is not None else default_sentences(seed=seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = f"{output_path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(model.getvalue())
    os.replace(tmp, output_path)
    return output_path
