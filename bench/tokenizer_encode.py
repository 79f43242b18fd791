"""Benchmark: image tokenizer encode throughput, ours vs the reference's computation, in the same run (JSON lines).

    python bench/tokenizer_encode.py --device cuda                  # Libra geometry (ViT-L/14-336), bf16, random weights
    python bench/tokenizer_encode.py --preset tiny --dtype fp32     # CPU smoke run

``ours``: ``ImageTokenizer.encode`` (CLIP to block 22 keeping 4 states, fused 4096->18 GEMM, csrc packing).
``reference``: what the Libra code computes for the same ids: a full 24-block ``CLIPVisionModel`` forward with
``output_hidden_states``, select/concat/drop CLS, ``quant_conv`` (1x1 conv 4096->1024), LFQ ``project_in``, then
``(u > 0) * mask`` summed in torch. Also ``clip_features`` alone (what training runs each step) and ``decode``.
Weights are random (the cost does not depend on them). Medians of ``--repeat`` timings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer, ImageTokenizerConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time_ms(fn, device: str, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="libra", choices=["libra", "tiny"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=None, help="images per call (default 64 on CUDA, 2 on CPU)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    batch = args.batch or (64 if device == "cuda" else 2)
    torch.manual_seed(0)
    with torch.device(device):
        model = ImageTokenizer.tiny(0) if args.preset == "tiny" else ImageTokenizer(ImageTokenizerConfig())
    model = model.to(device=device, dtype=dtype).frozen()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    full_config = CLIPVisionConfig(**dict(model.config.clip, num_hidden_layers=24 if args.preset == "libra" else 24))
    with torch.device(device):
        full = CLIPVisionModel(full_config).to(dtype).eval()
    full.load_state_dict(model.encoder.vision_tower.state_dict(), strict=False)
    pixels = torch.randn(batch, 3, 336, 336, device=device)

    @torch.no_grad()
    def reference():
        out = full(pixels.to(dtype), output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i] for i in model.encoder.select_layers], dim=-1)[:, 1:]
        n, p, f = feats.shape
        z = model.quant_conv(feats.view(n, model.grid, model.grid, f).permute(0, 3, 1, 2))
        u = model.quantize.project_in(z.permute(0, 2, 3, 1).reshape(n, p, -1))
        bits = (u.unflatten(-1, (model.num_codebooks, model.quantize.codebook_dim)) > 0).long()
        return (bits * model.quantize.mask).sum(-1).permute(2, 0, 1)

    codes, features = model.encode(pixels)
    agree = (codes == reference()).float().mean().item()
    timings = {
        "encode_ms": _time_ms(lambda: model.encode(pixels), device, args.repeat),
        "reference_encode_ms": _time_ms(reference, device, args.repeat),
        "clip_features_ms": _time_ms(lambda: model.clip_features(pixels), device, args.repeat),
        "codes_from_features_ms": _time_ms(lambda: model.codes_from_features(features), device, args.repeat),
        "decode_ms": _time_ms(lambda: model.decode(codes[:, : min(batch, 8)]), device, max(1, args.repeat // 2)),
    }
    row = {
        "bench": "tokenizer_encode", "preset": args.preset, "device": device,
        "card": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": args.dtype, "batch": batch, **{k: round(v, 3) for k, v in timings.items()},
        "encode_images_per_s": round(batch / timings["encode_ms"] * 1e3, 1),
        "reference_images_per_s": round(batch / timings["reference_encode_ms"] * 1e3, 1),
        "speedup": round(timings["reference_encode_ms"] / timings["encode_ms"], 2),
        "decode_images": min(batch, 8), "ids_agree_with_reference": round(agree, 5),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
