"""Benchmark of the data pipeline (JSON lines on stdout; summary table on stderr).

    python bench/data.py                          # 50M-sample index builds, reads, preprocessing on CPU
    python bench/data.py --samples 5000000 --skip-preprocess
    python bench/data.py --device cuda --only preprocess --full-size-tokenizer --images 512 --workers 12 \
        --batch-size 128                          # GPU image tokenisation at the real ViT-L size

Sections:
- ``index``: at ``--samples`` synthetic documents (instruct-like lengths, 60-2048 tokens): the shuffle
  (our keyed permutation in C++, our numpy reference, and numpy ``RandomState.permutation`` which megatron-core's
  GPTDataset uses), the sample index (our packing plan vs megatron-core's ``build_sample_idx``: both map documents
  to fixed-length samples; theirs splits documents across samples, ours never does), and blending (ours vs
  megatron-core's ``build_blending_indices``, same algorithm, outputs checked equal), and the whole sample order.
- ``read``: random-access ``LibraDataset[i]`` samples/s over a synthetic pretrain-like dataset (one 336^2
  photo-like image per sample, WebP), with and without packing, plus the raw piece reads alone.
- ``preprocess``: ``tools/preprocess_images.py`` images/s on generated JPEGs with the tiny image tokenizer
  (``--device``), for 0 and ``--workers`` decode workers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("LIBRA_REQUIRE_EXTENSION", "1")

from libra_megatron.ops import index_helpers as ih  # noqa: E402

RESULTS = []


def emit(section: str, name: str, **values) -> None:
    record = {"bench": "data", "section": section, "name": name, **values}
    RESULTS.append(record)
    print(json.dumps(record), flush=True)


def timed(fn, repeat: int = 1):
    """(best seconds, last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_index(samples: int, repeat: int) -> None:
    from megatron.core.datasets import helpers as megatron_helpers

    from libra_megatron.data.packing import build_sample_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(60, 2049, size=samples, dtype=np.int32)
    key = ih.derive_key(1234, 0, 0, 0)

    seconds, ours = timed(lambda: ih.index_permutation(samples, key), repeat)
    emit("index", "shuffle.ours_cpp", samples=samples, seconds=round(seconds, 3))
    seconds, theirs = timed(lambda: np.random.RandomState(1234).permutation(samples), repeat)
    emit("index", "shuffle.numpy_randomstate(megatron)", samples=samples, seconds=round(seconds, 3))
    del theirs
    small = min(samples, 5_000_000)
    seconds, reference = timed(lambda: ih.index_permutation_reference(small, key))
    emit("index", "shuffle.ours_numpy_reference", samples=small, seconds=round(seconds, 3),
         equal_to_cpp=bool(np.array_equal(reference, ih.index_permutation(small, key))))
    del reference

    ordered = lengths[ours]
    del ours
    seconds, plan = timed(lambda: ih.pack_documents(ordered, 2048, 64), repeat)  # noqa: F821 (timed() runs it before the del below)
    offsets, _ = plan
    fill = float(np.minimum(ordered, 2048).sum()) / ((len(offsets) - 1) * 2048)
    emit("index", "sample_index.ours_packing_plan_cpp", samples=samples, seconds=round(seconds, 3),
         packed_rows=int(len(offsets) - 1), fill=round(fill, 4))
    del plan, offsets
    small = min(samples, 200_000)
    seconds, _ = timed(lambda: ih.pack_documents_reference(ordered[:small], 2048, 64))  # noqa: F821 (timed() runs it before the del below)
    emit("index", "sample_index.ours_packing_plan_python_reference", samples=small, seconds=round(seconds, 3))
    documents = np.arange(samples, dtype=np.int32)
    tokens = int(lengths.sum())
    seconds, sample_idx = timed(lambda: megatron_helpers.build_sample_idx(lengths, documents, 2048, 1, tokens), repeat)  # noqa: F821 (timed() runs it before the del below)
    emit("index", "sample_index.megatron_build_sample_idx", samples=samples, seconds=round(seconds, 3),
         rows=int(len(sample_idx) - 1))
    del sample_idx, documents, ordered

    weights = np.array([0.5, 0.3, 0.2])
    seconds, ours = timed(lambda: ih.blending_indices(weights, samples), repeat)
    emit("index", "blending.ours_cpp", samples=samples, datasets=3, seconds=round(seconds, 3))

    def megatron_blend():
        dataset_index = np.zeros(samples, dtype=np.int16)
        sample_index = np.zeros(samples, dtype=np.int64)
        megatron_helpers.build_blending_indices(dataset_index, sample_index, weights, 3, samples, False)
        return dataset_index, sample_index

    seconds, theirs = timed(megatron_blend, repeat)
    emit("index", "blending.megatron", samples=samples, datasets=3, seconds=round(seconds, 3),
         equal=bool(np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])))
    del ours, theirs

    seconds, _ = timed(lambda: build_sample_order([None], [samples], None, samples, 700, 1234, False, 64))
    emit("index", "sample_order.pretrain_no_packing", samples=samples, seconds=round(seconds, 3))
    seconds, _ = timed(lambda: build_sample_order([lengths], [samples], None, None, 2048, 1234, True, 64))
    emit("index", "sample_order.instruct_packing_one_epoch", samples=samples, seconds=round(seconds, 3))


def _photo_like(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(300, 900)), int(rng.integers(300, 900))
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (7 + seed % 5)) * 60 + x * 150 / w, np.cos(y / 11) * 50 + y * 120 / h,
                     ((x * y) % 97) * 1.5], -1)
    noise = rng.normal(0, 14, size=base.shape)
    return Image.fromarray(np.clip(base + noise + 40, 0, 255).astype(np.uint8), "RGB")


def bench_read(count: int, reads: int, workdir: str) -> None:
    import torch

    from libra_megatron.data.dataset import LibraDataset, LibraDatasetConfig
    from libra_megatron.data.indexed import SampleWriter, index_dtype
    from libra_megatron.data.pixel_codec import encode_pixels
    from libra_megatron.data.samples import Piece, PieceKind
    from libra_megatron.data.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, atomic_write_json, vocab_to_json
    from libra_megatron.tokenizer.image_processing import to_model_pixels
    from libra_megatron.vocab import LIBRA_VOCAB

    torch.set_num_threads(1)
    prefix = os.path.join(workdir, "read")
    rng = np.random.default_rng(0)
    blobs = [encode_pixels(to_model_pixels(_photo_like(s)), "webp") for s in range(16)]
    writer = SampleWriter(prefix + ".bin", LIBRA_VOCAB)
    for i in range(count):
        caption = tuple(int(t) for t in rng.integers(3, 32000, size=int(rng.integers(5, 60))))
        pieces = [Piece(PieceKind.TEXT, (1,)), Piece(PieceKind.IMAGE_TARGET, image=0), Piece(PieceKind.TEXT, (13,)),
                  Piece(PieceKind.TEXT_TARGET, caption)]
        writer.add_sample(pieces, [rng.integers(0, 512, size=(2, 576))], [blobs[i % len(blobs)]])
    writer.finalize(prefix + ".idx")
    atomic_write_json(prefix + ".json", {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "kind": "pretrain",
                                         "vocab": vocab_to_json(LIBRA_VOCAB), "index_dtype": np.dtype(index_dtype(LIBRA_VOCAB)).name,
                                         "pixels": {"format": "webp", "size": 336}, "counts": {"samples": count}})
    emit("read", "dataset", samples=count, bytes_per_sample=round(os.path.getsize(prefix + ".bin") / count),
         webp_bytes_per_image=round(float(np.mean([len(b) for b in blobs]))))
    for packing, seq in ((False, 700), (True, 2048)):
        ds = LibraDataset(LibraDatasetConfig([prefix], seq_length=seq, packing=packing))
        order = np.random.default_rng(1).integers(0, len(ds), size=reads)
        ds[0]
        seconds, _ = timed(lambda: [ds[int(i)] for i in order])
        emit("read", f"random_getitem.{'packed_2048' if packing else 'pretrain_700'}", reads=reads,
             samples_per_s=round(reads / seconds, 1), images_per_sample=round(
                 float(np.mean([ds[int(i)]['pixels'].shape[0] for i in order[:50]])), 2), threads=1)
    reader = ds.readers[0]
    order = np.random.default_rng(2).integers(0, len(reader), size=reads * 10)
    seconds, _ = timed(lambda: [reader.pieces(int(i)) for i in order])
    emit("read", "random_pieces_only", reads=len(order), samples_per_s=round(len(order) / seconds, 1))


def bench_preprocess(images: int, workers: int, device: str, workdir: str, batch_size: int, full_size: bool) -> None:
    from libra_megatron.data.preprocess_job import PreprocessConfig, run_preprocessing
    from libra_megatron.data.sentencepiece_training import train_sentencepiece

    tokenizer_dir = None
    if full_size:  # random weights with the real geometry (CLIP ViT-L/14-336 to block 22): realistic cost
        from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

        tokenizer_dir = os.path.join(workdir, "vision_tokenizer")
        ImageTokenizer().save_pretrained(tokenizer_dir)

    folder = os.path.join(workdir, "raw")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(workdir, "captions.jsonl"), "w") as handle:
        for i in range(images):
            _photo_like(i).save(os.path.join(folder, f"{i}.jpg"), quality=90)
            handle.write(json.dumps({"image": f"{i}.jpg", "caption": f"a photo number {i} of a small red house"}) + "\n")
    model = train_sentencepiece(os.path.join(workdir, "sp.model"), 512)

    # the per-image CPU work of a decode worker (read, decode, validate, pad/resize/crop, WebP, caption), 1 thread
    import torch

    from libra_megatron.data.preprocess_worker import PrepareSettings, prepare_record
    from libra_megatron.data.sources import build_source
    from libra_megatron.data.text_tokenizer import TextTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = PrepareSettings(TextTokenizer(model), "webp")
    source = build_source("image-folder", [os.path.join(workdir, "captions.jsonl")], folder, chunk_size=images)
    records = list(source.read(source.chunks()[0]))
    seconds, _ = timed(lambda: [prepare_record(r, settings) for r in records])
    emit("preprocess", "worker_cpu_per_image", images=len(records), ms_per_image=round(1000 * seconds / len(records), 2),
         images_per_s_per_core=round(len(records) / seconds, 1))
    torch.set_num_threads(threads)
    for w in sorted({0, workers}):
        prefix = os.path.join(workdir, f"pre{w}")
        config = PreprocessConfig(input_format="image-folder", inputs=[os.path.join(workdir, "captions.jsonl")],
                                  image_root=folder, output_prefix=prefix, tokenizer_model=model,
                                  tiny_image_tokenizer_seed=None if full_size else 0, image_tokenizer=tokenizer_dir,
                                  workers=w, batch_size=batch_size, device=device, chunk_size=max(images // 2, 1),
                                  progress=False)
        summary = run_preprocessing(config)
        emit("preprocess", f"{'vit_l_336' if full_size else 'tiny_clip'}.workers{w}", device=device,
             images=summary["images"], images_per_s=summary["images_per_s"], seconds=summary["processing_seconds"],
             batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50_000_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--read-samples", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=400)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32, help="images per image-tokenizer call (preprocess)")
    parser.add_argument("--full-size-tokenizer", action="store_true",
                        help="preprocess with a random full-size (ViT-L/14-336) tokenizer instead of the tiny one")
    parser.add_argument("--only", choices=("index", "read", "preprocess"), default=None)
    parser.add_argument("--skip-preprocess", action="store_true")
    args = parser.parse_args()
    import torch

    from libra_megatron.ops.extension import get_extension

    ext = get_extension()
    emit("env", "machine", date=datetime.date.today().isoformat(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
         platform=platform.platform(), device=args.device,
         gpu=torch.cuda.get_device_name(0) if args.device == "cuda" else None, openmp=bool(ext.with_openmp))
    workdir = tempfile.mkdtemp(prefix="libra-bench-data-")
    try:
        if args.only in (None, "index"):
            bench_index(args.samples, args.repeat)
        if args.only in (None, "read"):
            bench_read(args.read_samples, args.reads, workdir)
        if args.only == "preprocess" or (args.only is None and not args.skip_preprocess):
            bench_preprocess(args.images, args.workers, args.device, workdir, args.batch_size, args.full_size_tokenizer)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for r in RESULTS:
        if r["section"] != "env":
            values = {k: v for k, v in r.items() if k not in ("bench", "section", "name")}
            print(f"{r['section']:<10s} {r['name']:<52s} {values}", file=sys.stderr)


if __name__ == "__main__":
    main()
