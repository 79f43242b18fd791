"""The sentencepiece text tokenizer of the data pipeline (LLaMA-2's ``tokenizer.model`` in real runs).

Samples are tokenised in *chunks* (text between images and special tokens) rather than as one string with
placeholders (docs/architecture.md#placing-images: build the id sequence directly). Two encodings are needed:

* :meth:`TextTokenizer.encode` — a chunk that starts a text segment (after ``<s>`` or ``</s>``): sentencepiece
  with its dummy-prefix ``▁``, exactly what the reference's HF tokenizer does to every segment split at a
  special token.
* :meth:`TextTokenizer.encode_continuation` — a chunk that continues the text right after an image (the
  reference's ``<img_ph>`` is a normalised added token, so the text after it gets no ``▁``): the same model
  with ``add_dummy_prefix`` off.

Chunks are always split just before a space or at a special token / image, and sentencepiece (with
``split_by_whitespace``) never merges across a ``▁``, so chunked ids equal those of the whole string.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List

import sentencepiece as spm

from libra_megatron.vocab import LibraVocab

NEWLINE_PIECE = "<0x0A>"


class TextTokenizerError(ValueError):
    """A tokenizer model that cannot be used by the data pipeline (named file, reason)."""


class TextTokenizer:
    """A LLaMA-style sentencepiece model: byte fallback, ``<unk>``=0 (also pad), ``<s>``, ``</s>``, ``<0x0A>``."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = os.fspath(model_path)
        try:
            with open(self.model_path, "rb") as handle:
                self._model_bytes = handle.read()
        except OSError as exc:
            raise TextTokenizerError(f"cannot read tokenizer model {self.model_path!r}: {exc}") from exc
        self._load()

    def _load(self) -> None:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(self._model_bytes)
            self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        except Exception as exc:  # noqa: BLE001 - protobuf/sentencepiece raise several types
            raise TextTokenizerError(f"{self.model_path!r} is not a sentencepiece model: {exc}") from exc
        if proto.normalizer_spec.remove_extra_whitespaces:
            raise TextTokenizerError(
                f"{self.model_path!r}: normalizer_spec.remove_extra_whitespaces is true; the data pipeline needs a "
                "LLaMA-style model (false) so that text chunks tokenise exactly like the whole string"
            )
        if self._sp.piece_to_id(NEWLINE_PIECE) == self._sp.unk_id():
            raise TextTokenizerError(f"{self.model_path!r}: no byte-fallback piece {NEWLINE_PIECE} (newline)")
        for name, value in (("bos_id", self._sp.bos_id()), ("eos_id", self._sp.eos_id())):
            if value < 0:
                raise TextTokenizerError(f"{self.model_path!r}: the model defines no {name}")
        proto.normalizer_spec.add_dummy_prefix = False
        self._continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    # pickling (multiprocessing workers): ship the model bytes, rebuild the processors
    def __getstate__(self) -> Dict[str, Any]:
        return {"model_path": self.model_path, "model_bytes": self._model_bytes}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.model_path = state["model_path"]
        self._model_bytes = state["model_bytes"]
        self._load()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def newline_id(self) -> int:
        return self._sp.piece_to_id(NEWLINE_PIECE)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._model_bytes).hexdigest()

    def encode(self, text: str) -> List[int]:
        """Ids of a chunk that starts a text segment (dummy-prefix ``▁``, no ``<s>``)."""
        return self._sp.encode(text)

    def encode_continuation(self, text: str) -> List[int]:
        """Ids of a chunk that continues the text right after an image (no dummy prefix)."""
        return self._continuation.encode(text)

    def decode(self, ids: List[int]) -> str:
        """Text of text ids (for logs and tests)."""
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def libra_vocab(self, codebook_size: int = 512, num_codebooks: int = 2, image_resolution: int = 24) -> LibraVocab:
        """The two-plane Libra vocabulary on top of this text vocabulary (pad = id 0, as in LLaMA-2)."""
        return LibraVocab(
            text_vocab_size=self.vocab_size,
            codebook_size=codebook_size,
            num_codebooks=num_codebooks,
            image_resolution=image_resolution,
            pad_id=0,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            newline_id=self.newline_id,
        )

    def identity(self) -> Dict[str, Any]:
        """What the sidecar records about this tokenizer."""
        return {
            "file": os.path.basename(self.model_path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "newline_id": self.newline_id,
        }
