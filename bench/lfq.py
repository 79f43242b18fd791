"""Benchmark: LFQ code packing, csrc kernel vs the PyTorch reference, in the same run (JSON lines on stdout).

    python bench/lfq.py                         # CPU, 64/256/1024 images, fp32 + bf16
    python bench/lfq.py --device cuda           # GPU: also the copy-bandwidth yardstick

Each case packs logits ``[N, 576, 18]`` into model-space image spans ``[2, N, 578]`` (bias add, offset,
<boi>/<eoi>: what ``ImageTokenizer.encode_tokens`` does after its GEMM) and, as ``pack``, codes ``[2, N, 576]``
without bias. ``copy_ms`` is ``logits.clone()`` of the same bytes (read + write); ``vs_copy`` = kernel time /
copy time, the goal on GPU is <= 2 (the kernel reads the same bytes and writes ~1/4 as much). Goal on CPU: kernel
>= 10x faster than the reference. Medians of ``--repeat`` timings, each the mean of ``--inner`` calls.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("LIBRA_REQUIRE_EXTENSION", "1")  # a benchmark without the kernel is meaningless

from libra_megatron.ops import lfq  # noqa: E402
from libra_megatron.ops.extension import get_extension  # noqa: E402
from libra_megatron.vocab import LIBRA_VOCAB  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _time_ms(fn, device: str, repeat: int, inner: int) -> float:
    fn()  # warm-up (allocator, first-touch, kernel load)
    samples = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / inner)
        else:
            begin = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - begin) * 1e3 / inner)
    return statistics.median(samples)


def _card(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def run_case(images: int, dtype: torch.dtype, device: str, repeat: int, inner: int) -> list:
    generator = torch.Generator().manual_seed(images)
    logits = torch.randn(images, LIBRA_VOCAB.patches_per_image, 18, generator=generator).to(dtype).to(device)
    bias = torch.randn(18, generator=generator).to(device)
    vocab = LIBRA_VOCAB
    spans_args = (2, bias, vocab.image_offset, vocab.boi_id, vocab.eoi_id)
    cases = {
        "spans": (lambda: lfq.lfq_image_ids_reference(logits, *spans_args), lambda: lfq.lfq_image_ids(logits, *spans_args)),
        "pack": (lambda: lfq.lfq_image_ids_reference(logits, 2), lambda: lfq.lfq_image_ids(logits, 2)),
    }
    read_bytes = logits.numel() * logits.element_size()
    copy_ms = _time_ms(lambda: logits.clone(), device, repeat, inner)
    rows = []
    for name, (reference, kernel) in cases.items():
        assert torch.equal(reference(), kernel()), f"kernel differs from the reference ({name})"
        ref_ms = _time_ms(reference, device, repeat, max(1, inner // 4))
        ker_ms = _time_ms(kernel, device, repeat, inner)
        written = kernel().numel() * 8
        rows.append({
            "bench": "lfq", "case": name, "device": device, "card": _card(device), "images": images,
            "dtype": str(dtype).replace("torch.", ""), "reference_ms": round(ref_ms, 4), "kernel_ms": round(ker_ms, 4),
            "speedup": round(ref_ms / ker_ms, 2), "copy_ms": round(copy_ms, 4), "vs_copy": round(ker_ms / copy_ms, 2),
            "kernel_read_GBps": round(read_bytes / ker_ms / 1e6, 2),
            "kernel_rw_GBps": round((read_bytes + written) / ker_ms / 1e6, 2),
            "copy_rw_GBps": round(2 * read_bytes / copy_ms / 1e6, 2),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, nargs="+", default=None, help="images per call (default per device)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--inner", type=int, default=None, help="calls per timing (default 5 on CPU, 50 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ext = get_extension()
    if args.device == "cuda" and not (torch.cuda.is_available() and ext.with_cuda):
        raise SystemExit("--device cuda needs a GPU and libra_megatron._C built with CUDA (make install on the GPU machine)")
    images = args.images or ([64, 256, 1024] if args.device == "cpu" else [256, 1024, 8192])
    inner = args.inner or (5 if args.device == "cpu" else 50)
    for count in images:
        for dtype in args.dtypes:
            for row in run_case(count, DTYPES[dtype], args.device, args.repeat, inner):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
