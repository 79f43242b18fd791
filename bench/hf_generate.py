#!/usr/bin/env python
"""The exported HF ``LibraForCausalLM`` on a device: correctness checks, then generation speed; JSON lines.

    python bench/hf_generate.py --device cuda              # checks (tiny) + libra-7b-shaped (11B) timing in bf16
    python bench/hf_generate.py --device cpu --skip-large  # the checks only

Checks (tiny random model, real 578-position images): the device's fp32 logits equal the CPU's; greedy decoding
gives identical tokens with and without the KV cache; bf16 SDPA and bf16 eager attention agree to bf16 precision.
Timing (random libra-7b weights, 11.0B parameters, bf16): prefill of one image + a short question, then greedy
decoding of ``--new-tokens`` tokens, for batch 1 and 4; reports ms, tokens/s and peak memory. Uses only torch +
transformers + the shipped modeling files (no megatron).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libra_megatron.hf_modeling.configuration_libra import LibraConfig  # noqa: E402
from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM  # noqa: E402


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def prompt(config: LibraConfig, batch: int, text_before: int = 3, text_after: int = 20, seed: int = 0):
    """ids [2,B,L], vision_indices, CLIP signal for ``<s> text <image> \\n question``."""
    g = torch.Generator().manual_seed(seed)
    v, k, n = config.vocab_size, config.vision_vocab_size - 2, config.max_vision_token_length
    before = torch.randint(3, v, (batch, text_before), generator=g)
    after = torch.randint(3, v, (batch, text_after), generator=g)
    codes = torch.randint(0, k, (2, batch, n - 2), generator=g) + v
    image = torch.cat([torch.full((2, batch, 1), v + k), codes, torch.full((2, batch, 1), v + k + 1)], dim=2)
    ids = torch.cat([before.expand(2, -1, -1), image, after.expand(2, -1, -1)], dim=2)
    vi = torch.cat([torch.full((batch, text_before), n), torch.arange(n).expand(batch, -1),
                    torch.full((batch, text_after), n)], dim=1)
    signal = torch.zeros(batch, ids.shape[-1], config.contiguous_signal_size)
    patch = (vi >= 1) & (vi <= n - 2)
    signal[patch] = torch.randn(int(patch.sum()), config.contiguous_signal_size, generator=g)
    return ids, vi, signal


def checks(device: str) -> None:
    config = LibraConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                         contiguous_signal_size=64, vocab_size=1000)
    torch.manual_seed(0)
    model = LibraForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bridge" in name and name.endswith("weight_B"):
                param.normal_(0, 0.05)
    ids, vi, signal = prompt(config, batch=2)
    with torch.no_grad():
        cpu = model(input_ids=ids, vision_indices=vi, contiguous_signal=signal).logits
        model.to(device)
        dev = model(input_ids=ids.to(device), vision_indices=vi.to(device), contiguous_signal=signal.to(device)).logits.cpu()
    finite = torch.isfinite(cpu)
    emit(check="fp32 logits device vs cpu", device=device, max_abs_diff=float((dev[finite] - cpu[finite]).abs().max()),
         ok=bool(torch.equal(finite, torch.isfinite(dev)) and (dev[finite] - cpu[finite]).abs().max() < 1e-3))
    kwargs = dict(vision_indices=vi.to(device), contiguous_signal=signal.to(device), max_new_tokens=12, eos_token_id=[])
    cached = model.generate(ids.to(device), use_cache=True, **kwargs)
    uncached = model.generate(ids.to(device), use_cache=False, **kwargs)
    emit(check="greedy cached == uncached", device=device, ok=bool(torch.equal(cached, uncached)))
    model.to(torch.bfloat16)
    with torch.no_grad():
        sdpa = model(input_ids=ids.to(device), vision_indices=vi.to(device), contiguous_signal=signal.to(device)).logits
        model.config._attn_implementation = "eager"
        eager = model(input_ids=ids.to(device), vision_indices=vi.to(device), contiguous_signal=signal.to(device)).logits
        model.config._attn_implementation = "sdpa"
    finite = torch.isfinite(sdpa)
    diff = float((sdpa[finite].float() - eager[finite].float()).abs().max())
    scale = float(sdpa[finite].float().abs().max())
    emit(check="bf16 sdpa vs eager", device=device, max_abs_diff=diff, max_abs_logit=scale, ok=diff <= 0.05 * scale)


def timing(device: str, new_tokens: int) -> None:
    """Libra-7B-shaped (11.0B) random bf16 model: prefill and greedy decode timing, batch 1 and 4."""
    config = LibraConfig()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    started = time.perf_counter()
    with torch.device(device):
        model = LibraForCausalLM(config).eval()
    torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    emit(stage="built libra-7b (random)", params=params, seconds=round(time.perf_counter() - started, 1))
    for batch in (1, 4):
        ids, vi, signal = prompt(config, batch)
        ids, vi, signal = ids.to(device), vi.to(device), signal.to(device, torch.bfloat16)
        for _ in range(2):  # warm-up, then measured
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, vision_indices=vi, contiguous_signal=signal, logits_to_keep=1)
            sync(device)
            prefill = time.perf_counter() - t0
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, vision_indices=vi, contiguous_signal=signal, max_new_tokens=new_tokens, eos_token_id=[])
        sync(device)
        total = time.perf_counter() - t0
        decode = max(total - prefill, 1e-9)
        emit(stage="generate", model="libra-7b random bf16", batch=batch, prompt_tokens=int(ids.shape[-1]),
             new_tokens=int(out.shape[-1] - ids.shape[-1]), prefill_ms=round(prefill * 1e3, 1),
             decode_ms_per_token=round(decode * 1e3 / (new_tokens - 1), 2),
             decode_tokens_per_s=round(batch * (new_tokens - 1) / decode, 1),
             peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.startswith("cuda") else None)


def llama_baseline(device: str, new_tokens: int) -> None:
    """transformers' LlamaForCausalLM with LLaMA-2-7B shapes (random, bf16), same prompt length, same decode length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(default)
    for batch in (1, 4):
        ids = torch.randint(3, 32000, (batch, 601), device=device)
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, logits_to_keep=1)
        sync(device)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync(device)
        decode = max(time.perf_counter() - t0 - prefill, 1e-9)
        emit(stage="generate", model="transformers LlamaForCausalLM 7B random bf16 (baseline)", batch=batch,
             prompt_tokens=601, new_tokens=int(out.shape[-1] - 601), prefill_ms=round(prefill * 1e3, 1),
             decode_ms_per_token=round(decode * 1e3 / (new_tokens - 1), 2),
             decode_tokens_per_s=round(batch * (new_tokens - 1) / decode, 1))
    del model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-large", action="store_true", help="only the tiny correctness checks")
    parser.add_argument("--baseline-llama", action="store_true", help="also time transformers' LLaMA-2-7B shapes")
    args = parser.parse_args()
    import transformers

    emit(device=args.device, name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
         torch=torch.__version__, transformers=transformers.__version__)
    checks(args.device)
    if not args.skip_large:
        timing(args.device, args.new_tokens)
        if args.baseline_llama:
            llama_baseline(args.device, args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
