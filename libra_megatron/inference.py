"""Captioning / visual question answering with an exported HF Libra model (the library side of ``tools/generate.py``).

Prompts are built as id sequences directly (docs/architecture.md#placing-images), exactly as the data pipeline builds instruction samples:

* chat (Libra-Chat, vicuna_v1): ``<s>`` + ``SYSTEM USER:`` + image + ``\\n{question} ASSISTANT:``
* raw (Libra-Base): ``<s>`` + image + ``\\n{prompt}`` (an empty prompt captions the image)

The image is ``<boi>``, 576 code pairs, ``<eoi>`` (578 positions) with the frozen CLIP features at the patch
positions; several prompts are batched with left padding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from libra_megatron.data.samples import VICUNA_V1_SYSTEM
from libra_megatron.data.text_tokenizer import TextTokenizer
from libra_megatron.vocab import LibraVocab


@dataclass
class PreparedBatch:
    """Model inputs of a left-padded batch of prompts."""

    input_ids: torch.Tensor  # [C, B, L]
    vision_indices: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    contiguous_signal: torch.Tensor  # [B, L, F]


def vocab_of(config) -> LibraVocab:
    """The two-plane id space of an HF ``LibraConfig``."""
    return LibraVocab(text_vocab_size=config.vocab_size, codebook_size=config.vision_vocab_size - 2,
                      num_codebooks=config.vision_codebook_num, image_resolution=config.image_feature_resolution,
                      pad_id=config.pad_token_id, bos_id=config.bos_token_id, eos_id=config.eos_token_id,
                      newline_id=config.newline_token_id)


def prompt_text_ids(tokenizer: TextTokenizer, question: str, chat: bool) -> List[List[int]]:
    """Text ids before and after the image: ``[before, after]`` (``<s>`` included in ``before``)."""
    if chat:
        return [[tokenizer.bos_id] + tokenizer.encode(VICUNA_V1_SYSTEM + " USER:"),
                tokenizer.encode_continuation("\n" + question + " ASSISTANT:")]
    return [[tokenizer.bos_id], tokenizer.encode_continuation("\n" + question)]


def prepare_batch(tokenizer: TextTokenizer, vocab: LibraVocab, questions: Sequence[str], codes: torch.Tensor,
                  features: torch.Tensor, chat: bool) -> PreparedBatch:
    """Left-padded inputs for ``len(questions)`` prompts, prompt ``i`` about image ``i`` (codes [C, N, 576],
    features [N, 576, F])."""
    spans = vocab.image_span(codes)  # [C, N, 578]
    rows = []
    for i, question in enumerate(questions):
        before, after = prompt_text_ids(tokenizer, question, chat)
        text = lambda ids: torch.tensor(ids, dtype=torch.long).expand(vocab.num_codebooks, -1)  # noqa: E731
        ids = torch.cat([text(before), spans[:, i], text(after)], dim=1)
        vis = torch.cat([torch.full((len(before),), vocab.text_vision_index), vocab.image_vision_indices(),
                         torch.full((len(after),), vocab.text_vision_index)])
        signal = torch.zeros(ids.shape[1], features.shape[-1], dtype=features.dtype)
        signal[len(before) + 1: len(before) + 1 + vocab.patches_per_image] = features[i]
        rows.append((ids, vis, signal))
    length = max(r[0].shape[1] for r in rows)
    batch = len(rows)
    input_ids = torch.full((vocab.num_codebooks, batch, length), vocab.pad_id, dtype=torch.long)
    vision_indices = torch.full((batch, length), vocab.text_vision_index, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    signal = torch.zeros(batch, length, features.shape[-1], dtype=features.dtype)
    for b, (ids, vis, sig) in enumerate(rows):
        n = ids.shape[1]
        input_ids[:, b, length - n:] = ids
        vision_indices[b, length - n:] = vis
        mask[b, length - n:] = 1
        signal[b, length - n:] = sig
    return PreparedBatch(input_ids, vision_indices, mask, signal)


@dataclass
class Answer:
    """Decoded output of one prompt: the text and the model-space spans of any generated images."""

    text: str
    image_spans: List[torch.Tensor]
    new_tokens: int


def decode_output(tokenizer: TextTokenizer, vocab: LibraVocab, new_ids: torch.Tensor, new_vi: torch.Tensor) -> Answer:
    """Split generated ids [C, T] into text (decoded, stopping at ``</s>``) and complete image spans [C, 578]."""
    text_ids: List[int] = []
    spans: List[torch.Tensor] = []
    t, count = 0, 0
    while t < new_ids.shape[1]:
        token, index = int(new_ids[0, t]), int(new_vi[t])
        if index == vocab.text_vision_index:
            count += 1
            if token == vocab.eos_id:
                break
            text_ids.append(token)
            t += 1
            continue
        start = t  # an image (possibly started in the prompt): collect its positions
        while t < new_ids.shape[1] and int(new_vi[t]) != vocab.text_vision_index:
            t += 1
        count += t - start
        if t - start == vocab.image_positions:
            spans.append(new_ids[:, start:t])
    return Answer(tokenizer.decode(text_ids).strip(), spans, count)


def load_image_tokenizer(folder: str, device: str, dtype: Optional[torch.dtype] = None):
    """Our ``vision_tokenizer.safetensors`` export, or the released ``vqgan.ckpt`` (+ CLIP folder inside ``folder``)."""
    from libra_megatron.tokenizer.image_tokenizer import CONFIG_NAME, ImageTokenizer

    if os.path.exists(os.path.join(folder, CONFIG_NAME)):
        return ImageTokenizer.from_pretrained(folder, device=device, dtype=dtype)
    if os.path.exists(os.path.join(folder, "vision_tokenizer_config.yaml")):
        clip = os.path.join(folder, "openai-clip-vit-large-patch14-336")
        tokenizer = ImageTokenizer.from_released(folder, clip_folder=clip if os.path.isdir(clip) else None, device=device)
        return tokenizer.to(dtype) if dtype is not None else tokenizer
    raise FileNotFoundError(f"{folder}: no vision tokenizer ({CONFIG_NAME} or vision_tokenizer_config.yaml + vqgan.ckpt)")
