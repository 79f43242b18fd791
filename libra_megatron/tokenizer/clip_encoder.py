"""The frozen CLIP vision tower of the Libra tokenizer, run only as deep as needed (docs/architecture.md#clip-features).

Libra concatenates the hidden states of encoder blocks [2, 10, 18, 22] of CLIP ViT-L/14-336 (1-based; index 0
would be the embedding output after ``pre_layrnorm``), drops the CLS token and keeps ``[N, 576, 4 * 1024]``.
The reference runs all 24 blocks and keeps every hidden state; :class:`ClipFeatureEncoder` builds only
``max(select_layers)`` blocks, keeps only the selected states and runs without autograd.

The tower is transformers' ``CLIPVisionModel`` (weights from a local folder or a converted checkpoint; nothing
is ever downloaded).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

LIBRA_SELECT_LAYERS = (2, 10, 18, 22)

# openai/clip-vit-large-patch14-336, vision part (transformers CLIPVisionConfig fields). Used when the
# released folder does not ship the CLIP config; the converter checks every weight shape against it.
VIT_L14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_channels=3,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
)

# A tiny random tower with the real geometry (336 px, patch 14 -> 24x24 patches) and >= 22 blocks, so the
# layer selection is the real one: features are 4 x 32 = 128-d.
TINY_CLIP = dict(VIT_L14_336, hidden_size=32, intermediate_size=64, projection_dim=32, num_attention_heads=2)


def clip_vision_config(values: Union[Dict[str, Any], CLIPVisionConfig]) -> CLIPVisionConfig:
    """A ``CLIPVisionConfig`` from a dict of its fields (or a copy of a config); eager attention by default."""
    if isinstance(values, CLIPVisionConfig):
        config = copy.deepcopy(values)
    else:
        fields = {k: v for k, v in values.items() if k not in ("model_type", "transformers_version", "architectures")}
        config = CLIPVisionConfig(**fields)
    return config


def load_clip_vision_config(folder: Union[str, os.PathLike]) -> CLIPVisionConfig:
    """Read the vision config of a local CLIP folder (a full ``CLIPModel`` config.json or a vision-only one)."""
    path = os.path.join(os.fspath(folder), "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the CLIP config {path!r}: {exc}") from exc
    vision = data.get("vision_config", data)
    if not isinstance(vision, dict) or "hidden_size" not in vision:
        raise ValueError(f"{path!r}: field 'vision_config' (or a vision config with 'hidden_size') is missing")
    return clip_vision_config(vision)


class ClipFeatureEncoder(nn.Module):
    """Frozen CLIP tower truncated after ``max(select_layers)`` blocks: pixels -> ``[N, P, len(layers) * hidden]``."""

    def __init__(self, config: Union[Dict[str, Any], CLIPVisionConfig], select_layers: Sequence[int] = LIBRA_SELECT_LAYERS):
        super().__init__()
        config = clip_vision_config(config)
        layers = tuple(int(layer) for layer in select_layers)
        if not layers or min(layers) < 0 or max(layers) > config.num_hidden_layers:
            raise ValueError(f"select_layers {layers} must lie in [0, {config.num_hidden_layers}] (CLIP blocks)")
        self.select_layers = layers
        # Only the blocks that feed a selected state are built; blocks beyond are never computed.
        config.num_hidden_layers = max(layers)
        self.config = config
        self.vision_tower = CLIPVisionModel(config)
        self.vision_tower.requires_grad_(False)
        self.vision_tower.eval()

    @property
    def feature_size(self) -> int:
        """Channels of one patch feature: ``len(select_layers) * hidden_size``."""
        return len(self.select_layers) * self.config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def train(self, mode: bool = True) -> "ClipFeatureEncoder":
        """The tower stays in eval mode (frozen, no dropout) whatever the parent module does."""
        super().train(mode)
        self.vision_tower.eval()
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised ``[N, 3, S, S]`` -> patch features ``[N, (S/patch)^2, F]`` in the tower's dtype (no CLS)."""
        size = self.config.image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (self.config.num_channels, size, size):
            raise ValueError(
                f"pixel_values must be [N, {self.config.num_channels}, {size}, {size}], got {tuple(pixel_values.shape)}"
            )
        model = self.vision_tower
        if pixel_values.size(0) == 0:
            return pixel_values.new_zeros((0, self.num_patches, self.feature_size), dtype=model.dtype)
        hidden = model.pre_layrnorm(model.embeddings(pixel_values))
        wanted = set(self.select_layers)
        states: Dict[int, torch.Tensor] = {0: hidden} if 0 in wanted else {}
        for index, block in enumerate(model.encoder.layers, start=1):
            hidden = block(hidden, None)
            if index in wanted:
                states[index] = hidden
        return torch.cat([states[layer][:, 1:] for layer in self.select_layers], dim=-1)

    def reference_features(self, pixel_values: torch.Tensor, full_tower: Optional[CLIPVisionModel] = None) -> torch.Tensor:
        """The reference computation (full forward with ``output_hidden_states``, select, cat, drop CLS), for tests."""
        tower = full_tower if full_tower is not None else self.vision_tower
        with torch.no_grad():
            out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
        return torch.cat([out.hidden_states[layer] for layer in self.select_layers], dim=-1)[:, 1:]
