"""The LFQ image decoder: quantised latents ``[N, z, 24, 24]`` -> images ``[N, 3, 336, 336]`` (docs/architecture.md#lfq-quantiser).

Same architecture and parameter names as the taming ``Decoder`` the released ``vqgan.ckpt`` was trained with
(``decoder.*`` keys load unchanged): conv_in, a Res-Attn-Res middle block at the latent resolution, then one
level per ``ch_mult`` entry from the deepest up, each with ``num_res_blocks + 1`` residual blocks (plus multi-head
attention at ``attn_resolutions``), nearest x2 upsampling between the deep levels and one final nearest
upsample by ``resolution / current`` (x1.75 for Libra: 24 -> 48 -> 96 -> 192 -> 336), GroupNorm(32)+SiLU, conv_out.
Attention uses ``scaled_dot_product_attention`` (same math as the reference's explicit softmax).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    """Decoder hyper-parameters, named as in the released ``ddconfig``."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: Tuple[int, ...] = (1, 1, 2, 4, 8)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (24,)
    dropout: float = 0.0
    resolution: int = 336
    z_channels: int = 1024
    initial_resolution: int = 24
    num_attn_head: int = 8

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "DecoderConfig":
        """Build from a dict (extra ``ddconfig`` keys such as ``encoder_name`` are ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in values.items() if k in known}
        for key in ("ch_mult", "attn_resolutions"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        values = asdict(self)
        values["ch_mult"], values["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return values


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice with a residual (1x1 ``nin_shortcut`` when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Spatial self-attention over the H*W positions with ``num_heads`` heads (1x1 conv q/k/v/proj_out)."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttnBlock: {channels} channels are not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # channel c = head * (c / heads) + d, as the reference reshapes [b, heads, c/heads, hw]
        q, k, v = (proj(h).reshape(b, self.num_heads, c // self.num_heads, height * width).transpose(2, 3)
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads], scale (c/heads)^-0.5
        out = out.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by ``scale_factor`` followed by a 3x3 conv."""

    def __init__(self, channels: int, scale_factor: float = 2.0):
        super().__init__()
        self.scale_factor = float(scale_factor)
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale_factor, mode="nearest"))


class Decoder(nn.Module):
    """Latents ``[N, z_channels, r, r]`` (r = ``initial_resolution``) -> ``[N, out_ch, resolution, resolution]``."""

    def __init__(self, config: Optional[DecoderConfig] = None):
        super().__init__()
        config = config or DecoderConfig()
        self.config = config
        levels = len(config.ch_mult)
        if levels < 2:
            raise ValueError("DecoderConfig.ch_mult needs at least two levels")
        block_in = config.ch * config.ch_mult[-1]
        resolution = config.initial_resolution
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, config.dropout)
        self.mid.attn_1 = AttnBlock(block_in, config.num_attn_head)
        self.mid.block_2 = ResnetBlock(block_in, block_in, config.dropout)

        ups = []
        for level in reversed(range(levels)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = config.ch * config.ch_mult[level]
            for _ in range(config.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    up.attn.append(AttnBlock(block_in, config.num_attn_head))
            if level > 1:
                up.upsample = Upsample(block_in, 2.0)
                resolution *= 2
            elif level == 1:  # the last upsample lands exactly on the output resolution
                up.upsample = Upsample(block_in, config.resolution / resolution)
                # The reference leaves its resolution counter at the pre-upsample value here, which only
                # matters if attn_resolutions held that value (not in any released config); track the truth.
                resolution = config.resolution
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents to images (unclamped; the training target lies in [-1, 1])."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for index, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[index](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
