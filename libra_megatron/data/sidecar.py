"""The JSON sidecar ``PREFIX.json`` of a preprocessed dataset: what produced it and what it holds.

It is written last (after ``.bin``/``.idx`` and the reject log), so its presence marks a complete dataset.
Fields: ``format``/``version``; ``kind`` (pretrain | instruct); ``vocab`` (the :class:`LibraVocab` fields);
``index_dtype`` (dtype of the ``.bin``, also the dtype of the stored codes); ``pieces`` (mode -> meaning);
``pixels`` (``format``, ``size``); ``text_tokenizer`` and ``image_tokenizer`` (identity: file/sha256, device,
dtype); ``counts`` (records, samples, images, text_tokens, rejected, rejected_by_reason); ``inputs``;
``rejects_file``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

from libra_megatron.vocab import LibraVocab

SIDECAR_FORMAT = "libra-megatron-indexed"
SIDECAR_VERSION = 1
VOCAB_FIELDS = ("text_vocab_size", "codebook_size", "num_codebooks", "image_resolution", "pad_id", "bos_id",
                "eos_id", "newline_id")


def sidecar_path(prefix: str) -> str:
    return prefix + ".json"


def atomic_write_json(path: str, value: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync, rename (readers never see a partial file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def vocab_to_json(vocab: LibraVocab) -> Dict[str, int]:
    return {name: int(getattr(vocab, name)) for name in VOCAB_FIELDS}


def read_sidecar(prefix: str) -> Dict[str, Any]:
    """Load and check ``PREFIX.json``; errors name the file and the field."""
    path = sidecar_path(prefix)
    if not os.path.exists(path):
        if os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx"):
            raise FileNotFoundError(f"{path} is missing: {prefix}.bin/.idx were not finalised (rerun the preprocessing "
                                    "job with the same arguments, or its --merge step)")
        raise FileNotFoundError(f"no preprocessed dataset at {prefix} ({path} does not exist)")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path}: field 'format' must be {SIDECAR_FORMAT!r}")
    if meta.get("version") != SIDECAR_VERSION:
        raise ValueError(f"{path}: field 'version' is {meta.get('version')!r}, this code reads {SIDECAR_VERSION}")
    for field in ("kind", "vocab", "index_dtype", "pixels", "counts"):
        if field not in meta:
            raise ValueError(f"{path}: missing field {field!r}")
    if meta["kind"] not in ("pretrain", "instruct"):
        raise ValueError(f"{path}: field 'kind' must be 'pretrain' or 'instruct', got {meta['kind']!r}")
    missing = [name for name in VOCAB_FIELDS if name not in meta["vocab"]]
    if missing:
        raise ValueError(f"{path}: field 'vocab' lacks {missing}")
    for field in ("format", "size"):
        if field not in meta["pixels"]:
            raise ValueError(f"{path}: field 'pixels' lacks {field!r}")
    return meta


def vocab_from_sidecar(meta: Dict[str, Any]) -> LibraVocab:
    """The :class:`LibraVocab` a dataset was written with."""
    return LibraVocab(**{name: int(meta["vocab"][name]) for name in VOCAB_FIELDS})
