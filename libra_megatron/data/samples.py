"""Ids, labels and masks of pretraining and instruction samples (docs/architecture.md#ids, docs/architecture.md#placing-images, docs/architecture.md#labels).

A sample is stored as an ordered list of *pieces* (see :class:`PieceKind`): text ids that are or are not
loss targets, and images whose codes are or are not loss targets. Preprocessing builds the pieces
(:func:`pretrain_pieces`, :func:`instruct_pieces`); training turns them into the model's two-plane ids
(:func:`assemble`) and shifted labels (:func:`shifted_labels`).

Pretraining (LAION-style, ``label_mask_strategy: instruction``, no EOS)::

    <s> | <boi> code_1 .. code_576 <eoi> | \\n | caption
    targets: code_1..code_576, <eoi>, caption          (never <s>, <boi>, the \\n after <eoi>)

Instruction (vicuna_v1; the image sits at the start of its human turn, with no loss)::

    <s> | SYSTEM USER: | <boi> .. <eoi> | \\n q1 ASSISTANT: | ▁a1 ▁ | </s> | USER: q2 ASSISTANT: | ▁a2 ▁ | </s>
    targets: every answer chunk and its </s>
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from libra_megatron.data.text_tokenizer import TextTokenizer
from libra_megatron.vocab import IGNORE_INDEX, LibraVocab

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TAG = "<image>"
DEFAULT_MAX_CAPTION_TOKENS = 256  # --max-caption-tokens


def caption_char_budget(max_tokens: int) -> int:
    """Characters of a raw caption that are cleaned and tokenised: 64 per allowed token (a LLaMA token is at
    most 16 characters, so only captions of mostly whitespace could lose tokens to this cut)."""
    return max(4096, (max_tokens + 1) * 64)
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class PieceKind(IntEnum):
    """The kind of one stored piece; also its ``sequence_modes`` value in the indexed dataset."""

    TEXT = 0  # text ids, not loss targets
    TEXT_TARGET = 1  # text ids that are loss targets
    IMAGE = 2  # an image (codes of both planes), not a loss target
    IMAGE_TARGET = 3  # an image whose codes and <eoi> are loss targets (<boi> never is)
    PIXELS = 4  # the encoded pixels of the image piece just before it


@dataclass(frozen=True)
class Piece:
    """One piece of a sample: text ids, or a reference to the sample's ``image``-th image."""

    kind: PieceKind
    ids: Tuple[int, ...] = ()
    image: int = -1


class SampleError(ValueError):
    """A record that cannot become a sample; ``reason`` is a short reject-log code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def clean_caption(caption: str, max_words: int = 64) -> str:
    """Reference ``LibraCaptionProcessor`` as configured for pretraining (docs/architecture.md#caption-processing): ``[*#~]`` -> space,
    runs of 2+ whitespace -> one space, strip, lowercase, keep at most ``max_words`` space-separated words."""
    caption = re.sub(r"[*#~]", " ", caption)
    caption = re.sub(r"\s{2,}", " ", caption).strip().lower()
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pretrain_pieces(tokenizer: TextTokenizer, caption: Optional[str], max_words: int = 64,
                    max_tokens: int = DEFAULT_MAX_CAPTION_TOKENS) -> List[Piece]:
    """Pieces of an image-caption pretraining sample (docs/architecture.md#labels table); the caption keeps at most ``max_words``
    words and ``max_tokens`` tokens (a caption without spaces is one word: only the token bound holds it)."""
    if caption is None:
        raise SampleError("missing_caption", "no caption")
    if not isinstance(caption, str):
        raise SampleError("bad_record", f"caption is a {type(caption).__name__}, not text")
    caption = caption[: caption_char_budget(max_tokens)]  # bounded work on a megabyte caption
    cleaned = clean_caption(caption, max_words)
    if not cleaned:
        raise SampleError("empty_caption", f"caption {caption[:80]!r} is empty after cleaning")
    ids = tokenizer.encode_continuation("\n" + cleaned)
    if not ids or ids[0] != tokenizer.newline_id:
        raise SampleError("bad_caption", f"'\\n' + caption does not start with the newline id: {ids[:3]}")
    return [
        Piece(PieceKind.TEXT, (tokenizer.bos_id,)),
        Piece(PieceKind.IMAGE_TARGET, image=0),
        Piece(PieceKind.TEXT, (tokenizer.newline_id,)),
        Piece(PieceKind.TEXT_TARGET, tuple(ids[1 : 1 + max_tokens])),
    ]


def _conversation_turns(conversations: Sequence[Dict], has_image: bool) -> List[Tuple[str, str, bool]]:
    """(role, text, image-before-text) per turn, after the reference's LLaVA preprocessing."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise SampleError("bad_conversation", "'conversations' must be a non-empty list")
    turns = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SampleError("bad_conversation", f"turn {index} has no text 'value'")
        role = str(turn.get("from", "")).lower()
        if role in HUMAN_ROLES:
            role = "human"
        elif role in ASSISTANT_ROLES:
            role = "gpt"
        else:
            raise SampleError("bad_conversation", f"turn {index} has unknown role {turn.get('from')!r}")
        turns.append((role, turn["value"]))
    if turns[0][0] != "human":  # the reference skips a leading assistant turn
        turns = turns[1:]
    if not turns:
        raise SampleError("bad_conversation", "no human turn")
    for index, (role, _) in enumerate(turns):
        if role != ("human" if index % 2 == 0 else "gpt"):
            raise SampleError("bad_conversation", f"turn {index} is {role!r}: roles must alternate human/gpt")
    result = []
    tagged = 0
    for role, value in turns:
        if IMAGE_TAG in value:
            if not has_image:
                result.append((role, value.replace(IMAGE_TAG, ""), False))
                continue
            if role != "human":
                raise SampleError("image_tag_mismatch", "<image> appears in an assistant turn")
            tagged += 1
            result.append((role, value.replace(IMAGE_TAG, "").strip(), True))
        else:
            result.append((role, value, False))
    if has_image and tagged != 1:
        raise SampleError("image_tag_mismatch", f"sample has one image but {tagged} turns with {IMAGE_TAG}")
    for role, value, image in result:
        if not value and not image:
            raise SampleError("empty_turn", f"empty {role} turn")
    return result


def instruct_pieces(
    tokenizer: TextTokenizer, conversations: Sequence[Dict], has_image: bool, system: str = VICUNA_V1_SYSTEM
) -> List[Piece]:
    """Pieces of a LLaVA-format conversation under the vicuna_v1 template (docs/architecture.md#labels)."""
    turns = _conversation_turns(conversations, has_image)
    pieces: List[Piece] = [Piece(PieceKind.TEXT, (tokenizer.bos_id,))]
    pending = system + " "  # un-tokenised prompt text (no loss) since the last boundary
    after_image = False  # the pending chunk continues right after an image (no dummy prefix)

    def flush_prompt() -> None:
        nonlocal pending, after_image
        if pending:
            ids = tokenizer.encode_continuation(pending) if after_image else tokenizer.encode(pending)
            pieces.append(Piece(PieceKind.TEXT, tuple(ids)))
        pending, after_image = "", False

    for role, value, image in turns:
        if role == "human":
            if image:
                pending += "USER:"  # the space before the image vanishes in the reference tokenisation
                flush_prompt()
                pieces.append(Piece(PieceKind.IMAGE, image=0))
                pending, after_image = ("\n" + value if value else ""), True
                pending += " "
            else:
                pending += "USER: " + value + " "
        else:
            pending += "ASSISTANT:"
            flush_prompt_after = after_image
            ids = tokenizer.encode_continuation(pending) if flush_prompt_after else tokenizer.encode(pending)
            pieces.append(Piece(PieceKind.TEXT, tuple(ids)))
            answer = tokenizer.encode_continuation(" " + value + " ")
            pieces.append(Piece(PieceKind.TEXT_TARGET, tuple(answer) + (tokenizer.eos_id,)))
            pending, after_image = "", False
    if pending.strip():
        flush_prompt()  # a trailing human turn without an answer: context only
    return _merge_adjacent_text(pieces)


def _merge_adjacent_text(pieces: List[Piece]) -> List[Piece]:
    merged: List[Piece] = []
    for piece in pieces:
        if merged and piece.kind in (PieceKind.TEXT, PieceKind.TEXT_TARGET) and merged[-1].kind == piece.kind:
            merged[-1] = Piece(piece.kind, merged[-1].ids + piece.ids)
        elif piece.kind in (PieceKind.TEXT, PieceKind.TEXT_TARGET) and not piece.ids:
            continue
        else:
            merged.append(piece)
    return merged


@dataclass
class AssembledSample:
    """One sample as model inputs: ``tokens [2, L]``, unshifted ``targets [L]`` (bool), ``vision_indices [L]``,
    and the images kept (indices into the sample's images, in order of their ``<boi>``)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    vision_indices: torch.Tensor
    images: List[int]

    @property
    def length(self) -> int:
        return int(self.tokens.size(1))


def piece_length(kind: int, size: int, vocab: LibraVocab) -> int:
    """Positions a stored piece occupies in the sequence."""
    if kind in (PieceKind.TEXT, PieceKind.TEXT_TARGET):
        return size
    if kind in (PieceKind.IMAGE, PieceKind.IMAGE_TARGET):
        return vocab.image_positions
    return 0


def assemble(pieces: Sequence[Tuple[int, np.ndarray]], vocab: LibraVocab, max_length: int) -> AssembledSample:
    """Stored pieces ``(kind, array)`` -> model ids, targets and vision indices, truncated to ``max_length``.

    Truncation keeps the leading text and never splits an image: an image that does not fit entirely is
    dropped together with everything after it (its pixels are then not used)."""
    planes = vocab.num_codebooks
    token_parts, target_parts, vision_parts, images = [], [], [], []
    length = 0
    image_number = -1
    for kind, array in pieces:
        kind = int(kind)
        if kind == PieceKind.PIXELS:
            continue
        if kind in (PieceKind.IMAGE, PieceKind.IMAGE_TARGET):
            image_number += 1
            if length + vocab.image_positions > max_length:
                break
            codes = torch.from_numpy(np.asarray(array, dtype=np.int64)).view(planes, vocab.patches_per_image)
            token_parts.append(vocab.image_span(codes))
            target = torch.ones(vocab.image_positions, dtype=torch.bool)
            target[0] = False  # <boi> is never a target
            if kind == PieceKind.IMAGE:
                target[:] = False
            target_parts.append(target)
            vision_parts.append(vocab.image_vision_indices())
            images.append(image_number)
            length += vocab.image_positions
        elif kind in (PieceKind.TEXT, PieceKind.TEXT_TARGET):
            take = min(len(array), max_length - length)
            if take <= 0:
                break
            ids = torch.from_numpy(np.asarray(array[:take], dtype=np.int64))
            token_parts.append(ids.unsqueeze(0).expand(planes, take))
            target_parts.append(torch.full((take,), kind == PieceKind.TEXT_TARGET, dtype=torch.bool))
            vision_parts.append(torch.full((take,), vocab.text_vision_index, dtype=torch.long))
            length += take
        else:
            raise ValueError(f"unknown piece kind {kind}")
    if not token_parts:
        raise ValueError("sample has no tokens")
    return AssembledSample(
        tokens=torch.cat(token_parts, dim=1),
        targets=torch.cat(target_parts),
        vision_indices=torch.cat(vision_parts),
        images=images,
    )


def shifted_labels(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Megatron-convention labels ``[C, L]``: ``labels[:, t] = tokens[:, t+1]`` where ``t+1`` is a target,
    else ``-100``; the last position of the sample predicts nothing."""
    labels = torch.full_like(tokens, IGNORE_INDEX)
    keep = targets[1:]
    labels[:, :-1] = torch.where(keep.unsqueeze(0), tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE_INDEX))
    return labels
