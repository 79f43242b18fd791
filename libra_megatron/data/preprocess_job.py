"""The preprocessing job behind ``tools/preprocess_images.py``: raw corpus -> ``PREFIX.bin/.idx`` + sidecar.

Flow per rank: enumerate the chunks of the input (a tar shard, or ``chunk_size`` annotation records), take
those with ``chunk_id % world_size == rank``, skip the committed ones (resume), and for each remaining chunk
stream its records through the ``--workers`` pool (decode, validate, model pixels, stored encoding, text
pieces), tokenise the images in batches of ``--batch-size`` with the LFQ image tokenizer (on GPU when
present), and write the chunk atomically (:mod:`libra_megatron.data.parts`). With one rank the merge follows;
with several, ``--merge`` joins the parts once every rank is done.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from libra_megatron.data.indexed import SampleWriter, index_dtype
from libra_megatron.data.parts import PartStore
from libra_megatron.data.pixel_codec import DEFAULT_PIXEL_FORMAT, PIXEL_FORMATS
from libra_megatron.data.preprocess_worker import DEFAULT_MAX_IMAGE_PIXELS, Prepared, PrepareSettings
from libra_megatron.data.records import DEFAULT_MAX_IMAGE_BYTES
from libra_megatron.data.rejects import RETRYABLE_REASONS, Rejected, count_by_reason
from libra_megatron.data.samples import DEFAULT_MAX_CAPTION_TOKENS, PieceKind
from libra_megatron.data.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, vocab_to_json
from libra_megatron.data.sources import Chunk, build_source
from libra_megatron.data.text_tokenizer import TextTokenizer
from libra_megatron.data.workers import WorkerPool, ordered_results
from libra_megatron.tokenizer.image_processing import IMAGE_SIZE, normalize_pixels

if TYPE_CHECKING:
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

logger = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    """Arguments of the preprocessing job (the CLI flags of ``tools/preprocess_images.py``)."""

    input_format: str
    inputs: List[str]
    output_prefix: str
    tokenizer_model: str
    image_tokenizer: Optional[str] = None  # folder (save_pretrained or the released yaml + ckpt)
    clip_model: Optional[str] = None  # CLIP folder for a released tokenizer
    tiny_image_tokenizer_seed: Optional[int] = None  # tests / CPU demo
    image_root: Optional[str] = None
    chunk_size: int = 1000
    workers: int = 0
    batch_size: int = 32
    device: str = "auto"
    tokenizer_dtype: str = "auto"  # auto: bf16 on CUDA (as the reference trained), fp32 on CPU
    rank: int = 0
    world_size: int = 1
    merge: str = "auto"  # auto (merge when world_size == 1) | only | never
    pixel_format: str = DEFAULT_PIXEL_FORMAT
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_caption_words: int = 64
    max_caption_tokens: int = DEFAULT_MAX_CAPTION_TOKENS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    image_key: str = "image"
    caption_key: str = "caption"
    progress: bool = True
    worker_timeout_s: float = 600.0  # --worker-timeout: seconds one record may take in a decode worker

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag when a setting is out of range or inconsistent."""
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"--rank must be in [0, --world-size={self.world_size}), got {self.rank}")
        if self.pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"--pixel-format must be one of {PIXEL_FORMATS}, got {self.pixel_format!r}")
        if self.batch_size <= 0 or self.workers < 0:
            raise ValueError("--batch-size must be > 0 and --workers >= 0")
        if (self.image_tokenizer is None) == (self.tiny_image_tokenizer_seed is None):
            raise ValueError("give exactly one of --image-tokenizer DIR and --tiny-image-tokenizer SEED")
        if self.merge not in ("auto", "only", "never"):
            raise ValueError(f"--merge must be auto, only or never, got {self.merge!r}")
        if self.max_image_bytes <= 0 or self.max_caption_tokens <= 0 or self.worker_timeout_s <= 0:
            raise ValueError("--max-image-bytes, --max-caption-tokens and --worker-timeout must be > 0")


def _resolve_device(config: PreprocessConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if config.tokenizer_dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif config.tokenizer_dtype in dtypes:
        dtype = dtypes[config.tokenizer_dtype]
    else:
        raise ValueError(f"--tokenizer-dtype must be auto, fp32, bf16 or fp16, got {config.tokenizer_dtype!r}")
    return device, dtype


def load_image_tokenizer(config: PreprocessConfig, device: torch.device,
                         dtype: torch.dtype) -> Tuple["ImageTokenizer", Dict[str, Any]]:
    """The frozen image tokenizer and its identity (name, weights sha256, device type, dtype)."""
    from libra_megatron.tokenizer import image_tokenizer as it

    if config.tiny_image_tokenizer_seed is not None:
        model, name = it.ImageTokenizer.tiny(config.tiny_image_tokenizer_seed), f"tiny:{config.tiny_image_tokenizer_seed}"
    elif os.path.exists(os.path.join(config.image_tokenizer, it.CONFIG_NAME)):
        model, name = it.ImageTokenizer.from_pretrained(config.image_tokenizer), os.path.basename(config.image_tokenizer.rstrip("/"))
    else:
        model = it.ImageTokenizer.from_released(config.image_tokenizer, clip_folder=config.clip_model)
        name = "released:" + os.path.basename(config.image_tokenizer.rstrip("/"))
    weights_sha256 = model.weights_sha256()
    model = model.frozen().to(device=device, dtype=dtype)
    identity = {"name": name, "weights_sha256": weights_sha256, "device_type": device.type,
                "dtype": str(dtype).replace("torch.", ""), "codebook_size": model.config.codebook_size,
                "num_codebooks": model.num_codebooks, "num_patches": model.num_patches}
    return model, identity


class _ChunkWriter:
    """Collects prepared records of one chunk, tokenises their images in batches, writes them in order."""

    def __init__(self, writer: SampleWriter, image_tokenizer, device, dtype, batch_size: int):
        self.writer, self.model, self.device, self.dtype = writer, image_tokenizer, device, dtype
        self.batch_size = batch_size
        self.pending: List[Prepared] = []
        self.counts = {"samples": 0, "images": 0, "text_tokens": 0}

    def add(self, prepared: Prepared) -> None:
        self.pending.append(prepared)
        if sum(p.pixels is not None for p in self.pending) >= self.batch_size:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        with_image = [p for p in self.pending if p.pixels is not None]
        codes = None
        if with_image:
            pixels = torch.from_numpy(np.stack([p.pixels for p in with_image])).to(self.device)
            codes, _ = self.model.encode(normalize_pixels(pixels).to(self.dtype))
            codes = codes.cpu().numpy()  # [C, N, P]
        image_number = 0
        for prepared in self.pending:
            image_codes, blobs = [], []
            if prepared.pixels is not None:
                image_codes, blobs = [codes[:, image_number]], [prepared.blob]
                image_number += 1
                self.counts["images"] += 1
            self.writer.add_sample(prepared.pieces, image_codes, blobs)
            self.counts["samples"] += 1
            self.counts["text_tokens"] += sum(len(p.ids) for p in prepared.pieces
                                              if p.kind in (PieceKind.TEXT, PieceKind.TEXT_TARGET))
        self.pending = []


class _Progress:
    """tqdm bar over records with images/s, kept and rejected counts."""

    def __init__(self, enabled: bool, total: Optional[int], rank: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=f"preprocess[rank {rank}]", dynamic_ncols=True, smoothing=0.1)
        self.kept = self.rejected = 0

    def update(self, rejected: bool) -> None:
        self.kept += not rejected
        self.rejected += rejected
        if self.bar is not None:
            self.bar.update(1)
            if (self.kept + self.rejected) % 16 == 0:
                self.bar.set_postfix(kept=self.kept, rejected=self.rejected, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(kept=self.kept, rejected=self.rejected)
            self.bar.close()


def _fingerprint(config: PreprocessConfig, source, text_tokenizer: TextTokenizer, image_identity: Dict[str, Any],
                 kind: str) -> Dict[str, Any]:
    """The settings that determine the output bytes (a rerun must match them to resume)."""
    return {"source": source.describe(), "kind": kind, "text_tokenizer_sha256": text_tokenizer.sha256,
            "image_tokenizer": image_identity, "pixel_format": config.pixel_format,
            "max_image_pixels": config.max_image_pixels, "max_caption_words": config.max_caption_words,
            "max_caption_tokens": config.max_caption_tokens, "max_image_bytes": config.max_image_bytes,
            "batch_size": config.batch_size}


def run_preprocessing(config: PreprocessConfig) -> Dict[str, Any]:
    """Run this rank's share of the job (and the merge when due); return a summary dict."""
    config.validate()
    start = time.perf_counter()
    source = build_source(config.input_format, config.inputs, config.image_root, config.chunk_size,
                          config.image_key, config.caption_key, config.max_image_bytes)
    chunks: List[Chunk] = source.chunks()
    text_tokenizer = TextTokenizer(config.tokenizer_model)
    settings = PrepareSettings(text_tokenizer, config.pixel_format, config.max_image_pixels, config.max_caption_words,
                               max_image_bytes=config.max_image_bytes, max_caption_tokens=config.max_caption_tokens)
    mine = [c for c in chunks if c.chunk_id % config.world_size == config.rank]
    store = PartStore(config.output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(config.output_prefix)), exist_ok=True)

    # The pool forks before any torch work so the workers inherit no OpenMP state.
    # A chunk is redone when it has no committed record, or one that is not final (a worker crash / timeout, a
    # shard I/O error).
    todo = [c for c in mine if not store.is_final(c.chunk_id)] if config.merge != "only" else []
    pool = None
    if todo and config.workers > 0:
        pool = WorkerPool(config.workers, settings, config.worker_timeout_s)
    try:
        device, dtype = _resolve_device(config)
        image_tokenizer, image_identity = load_image_tokenizer(config, device, dtype)
        vocab = text_tokenizer.libra_vocab(image_identity["codebook_size"], image_identity["num_codebooks"],
                                           int(round(image_identity["num_patches"] ** 0.5)))
        fingerprint = _fingerprint(config, source, text_tokenizer, image_identity, source.kind)
        store.prepare(fingerprint, [c.chunk_id for c in todo])  # merge-only touches no temporary file
        done_before = len(mine) - len(todo)
        summary = {"rank": config.rank, "chunks": len(mine), "chunks_resumed": done_before, "records": 0,
                   "samples": 0, "images": 0, "rejected_by_reason": {}, "retryable": 0}
        rejects: List[Dict[str, str]] = []
        total = sum(c.stop - c.start for c in todo) if config.input_format != "webdataset" else None
        progress = _Progress(config.progress, total, config.rank)
        window = max(4 * config.workers * 2, 2 * config.batch_size)
        processing_start = time.perf_counter()
        for chunk in todo:
            def fill(writer: SampleWriter, chunk: Chunk = chunk) -> Dict[str, Any]:
                chunk_writer = _ChunkWriter(writer, image_tokenizer, device, dtype, config.batch_size)
                chunk_rejects, records = [], 0
                for result in ordered_results(source.read(chunk), pool, window, settings):
                    records += 1
                    if isinstance(result, Rejected):
                        chunk_rejects.append(result.to_json())
                    else:
                        chunk_writer.add(result)
                    progress.update(isinstance(result, Rejected))
                chunk_writer.flush()
                retryable = sum(r["reason"] in RETRYABLE_REASONS for r in chunk_rejects)
                return dict(chunk_writer.counts, source=chunk.source, records=records, rejects=chunk_rejects,
                            final=retryable == 0)

            record = store.write_chunk(chunk.chunk_id, vocab, fill)
            rejects.extend(record["rejects"])
            summary["retryable"] += sum(r["reason"] in RETRYABLE_REASONS for r in record["rejects"])
            for name in ("records", "samples", "images"):
                summary[name] += record[name]
        progress.close()
        processing = time.perf_counter() - processing_start
    finally:
        if pool is not None:
            summary_workers_replaced = pool.replaced
            pool.close()  # terminates the workers; never only joins them
    if pool is not None:
        summary["workers_replaced"] = summary_workers_replaced
    if summary["retryable"]:
        logger.warning("%d record(s) failed for a passing reason (decode worker crash or timeout, shard I/O error) "
                       "and were rejected for now; rerun the same command to retry them", summary["retryable"])
    elapsed = time.perf_counter() - start
    summary["rejected_by_reason"] = count_by_reason(rejects)
    summary["rejected"] = len(rejects)
    summary["seconds"] = round(elapsed, 3)
    summary["processing_seconds"] = round(processing, 3)  # without start-up (imports, tokenizer load)
    summary["images_per_s"] = round(summary["images"] / processing, 2) if processing > 0 else 0.0
    if config.merge == "only" or (config.merge == "auto" and config.world_size == 1):
        sidecar = {
            "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "kind": source.kind, "vocab": vocab_to_json(vocab),
            "index_dtype": np.dtype(index_dtype(vocab)).name,
            "pieces": {str(int(k)): k.name.lower() for k in PieceKind},
            "pixels": {"format": config.pixel_format, "size": IMAGE_SIZE, "contents": "to_model_pixels uint8 [3,S,S]"},
            "text_tokenizer": text_tokenizer.identity(), "image_tokenizer": image_identity,
            "inputs": source.describe(),
            "settings": {k: v for k, v in asdict(config).items()
                         if k in ("max_image_pixels", "max_caption_words", "max_caption_tokens", "max_image_bytes",
                                   "batch_size", "pixel_format")},
        }
        merged = store.merge([c.chunk_id for c in chunks], index_dtype(vocab), sidecar)
        summary["dataset"] = {"prefix": config.output_prefix, **merged["counts"]}
    return summary


def format_summary(summary: Dict[str, Any]) -> str:
    """Human-readable end-of-job summary."""
    lines = [
        f"rank {summary['rank']}: {summary['records']} records in {summary['chunks']} chunk(s) "
        f"({summary['chunks_resumed']} already done) in {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s",
        f"  kept {summary['samples']} samples ({summary['images']} images), rejected {summary['rejected']}",
    ]
    for reason, count in summary["rejected_by_reason"].items():
        lines.append(f"    {reason:<20s} {count}")
    if summary.get("retryable"):
        lines.append(f"  {summary['retryable']} record(s) failed for a passing reason (worker crash/timeout, shard "
                     "I/O error): their chunks are not final; rerun the same command to retry them")
    if "dataset" in summary:
        d = summary["dataset"]
        lines.append(f"dataset {d['prefix']}: {d['samples']} samples, {d['images']} images, {d['text_tokens']} text "
                     f"tokens, {d['rejected']} rejected in total (see {d['prefix']}.rejects.jsonl)")
    return "\n".join(lines)


def summary_json(summary: Dict[str, Any]) -> str:
    """The summary as one line of JSON (sorted keys: stable output for scripts)."""
    return json.dumps(summary, sort_keys=True)
