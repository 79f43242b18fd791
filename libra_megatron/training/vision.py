"""The frozen CLIP tower on the first pipeline stage: the batch's uint8 ``pixels`` -> continuous features.

Only the tokenizer's CLIP encoder is kept (the LFQ quantiser and the pixel decoder are not needed for training);
it runs every step under ``no_grad`` in eval mode, in bf16 with ``--bf16`` (as the reference trained, docs/architecture.md#reference-defects
B8), and is never part of the model chunks, DDP or the optimizer. ``--image-tokenizer`` names a folder written by
``ImageTokenizer.save_pretrained`` (or converted from the released files), or ``tiny:SEED`` for the random tiny
tokenizer of tests and the CPU demo; it must be the tokenizer that produced the dataset's image codes.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any, Dict

import torch


def is_tiny_spec(spec: str) -> bool:
    """Whether ``--image-tokenizer`` asks for the random tiny tokenizer (``tiny`` or ``tiny:SEED``)."""
    return spec == "tiny" or spec.startswith("tiny:")


def is_random_spec(spec: str) -> bool:
    """Whether ``--image-tokenizer`` asks for random weights in the real geometry (``random:SEED``; benchmarks)."""
    return spec == "random" or spec.startswith("random:")


def load_image_tokenizer(spec: str) -> Any:
    """The :class:`ImageTokenizer` named by ``--image-tokenizer`` (on CPU, fp32, frozen)."""
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
    if is_tiny_spec(spec):
        return ImageTokenizer.tiny(seed).frozen()
    if is_random_spec(spec):  # ViT-L/14-336 geometry, random weights: throughput and memory benchmarks only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ImageTokenizer().frozen()
    if not os.path.isdir(spec):
        raise ValueError(f"--image-tokenizer: folder not found: {spec}")
    return ImageTokenizer.from_pretrained(spec).frozen()


def clip_geometry(spec: str) -> Dict[str, int]:
    """CLIP tower sizes of ``--image-tokenizer`` without loading weights (for FLOPs accounting); read once per
    tokenizer (a copy is returned, the cached one cannot be changed through it)."""
    return dict(_clip_geometry(spec))


@functools.lru_cache(maxsize=None)
def _clip_geometry(spec: str) -> Dict[str, int]:
    from libra_megatron.tokenizer.clip_encoder import LIBRA_SELECT_LAYERS, TINY_CLIP, VIT_L14_336

    clip, layers = dict(VIT_L14_336), LIBRA_SELECT_LAYERS
    if is_tiny_spec(spec):
        clip = dict(TINY_CLIP)
    elif os.path.isdir(spec):
        from libra_megatron.tokenizer.image_tokenizer import CONFIG_NAME

        path = os.path.join(spec, CONFIG_NAME)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
            clip = dict(values.get("clip", clip))
            layers = tuple(values.get("select_layers", layers))
    patches = (clip["image_size"] // clip["patch_size"]) ** 2
    return {"hidden": clip["hidden_size"], "ffn": clip["intermediate_size"], "blocks": max(layers),
            "tokens": patches + 1, "patch_dim": 3 * clip["patch_size"] ** 2, "patches": patches}


def clip_forward_flops(geometry: Dict[str, int], images: int) -> float:
    """Forward FLOPs of the truncated CLIP tower on ``images`` images (2 per MAC; full, non-causal attention)."""
    d, ffn, n = geometry["hidden"], geometry["ffn"], geometry["tokens"]
    per_block = 2.0 * n * (4 * d * d + 2 * d * ffn) + 4.0 * n * n * d
    patch_embed = 2.0 * geometry["patches"] * geometry["patch_dim"] * d
    return images * (geometry["blocks"] * per_block + patch_embed)


def check_tokenizer_matches_data(tokenizer: Any, args: argparse.Namespace) -> None:
    """Refuse to train when ``--image-tokenizer`` is not the tokenizer that wrote the image codes of the data
    (training and validation sets)."""
    blend = (getattr(args, "data_blend", None) or []) + (getattr(args, "valid_blend", None) or [])
    if args.mock_data or not blend:
        return
    from libra_megatron.data.sidecar import read_sidecar, sidecar_path

    ours = tokenizer.weights_sha256()
    for _, prefix in blend:
        recorded = (read_sidecar(prefix).get("image_tokenizer") or {}).get("weights_sha256")
        if recorded is not None and recorded != ours:
            raise ValueError(
                f"--image-tokenizer {args.image_tokenizer} (weights sha256 {ours[:12]}...) is not the tokenizer that "
                f"preprocessed {prefix} ({sidecar_path(prefix)}: image_tokenizer.weights_sha256 = {recorded[:12]}...)")


class FrozenClipFeatures:
    """``pixels uint8 [N, 3, H, W] -> clip_features [N, P, F]`` in the model's dtype, no grad."""

    def __init__(self, args: argparse.Namespace) -> None:
        from libra_megatron.tokenizer.image_processing import normalize_pixels

        tokenizer = load_image_tokenizer(args.image_tokenizer)
        check_tokenizer_matches_data(tokenizer, args)
        self.dtype = torch.bfloat16 if args.bf16 else torch.float32
        device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        self.encoder = tokenizer.encoder.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.feature_size = tokenizer.feature_size
        self._normalize = normalize_pixels
        del tokenizer  # the quantiser and the decoder are not needed for training

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalise and encode; the same computation as ``ImageTokenizer.clip_features(normalize_pixels(p))``."""
        return self.encoder(self._normalize(pixels).to(self.dtype)).to(self.dtype)
