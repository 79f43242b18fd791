"""The LFQ decoder (docs/architecture.md#lfq-quantiser): released geometry (156.45M parameters, 24 -> 336 with a final x1.75 nearest
upsample), attention equal to the reference's explicit multi-head softmax, output shapes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from libra_megatron.tokenizer.decoder import AttnBlock, Decoder, DecoderConfig, ResnetBlock


def _reference_multi_head_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The reference ``AttnBlock.forwar_multi_head`` (taming diffusionmodules/model.py), transcribed."""
    h_ = block.norm(x)
    q, k, v = block.q(h_), block.k(h_), block.v(h_)
    b, c, h, w = q.shape
    heads = block.num_heads
    q = q.reshape(b, heads, c // heads, h * w).permute(0, 1, 3, 2)
    k = k.reshape(b, heads, c // heads, h * w)
    w_ = torch.softmax((q @ k) * (int(c // heads) ** (-0.5)), dim=3)
    v = v.reshape(b, heads, c // heads, h * w)
    h_ = (v @ w_.permute(0, 1, 3, 2)).reshape(b, c, h, w)
    return x + block.proj_out(h_)


def test_released_geometry_on_meta():
    with torch.device("meta"):
        decoder = Decoder(DecoderConfig())  # the released ddconfig
        out = decoder(torch.empty(1, 1024, 24, 24))
    assert out.shape == (1, 3, 336, 336)
    assert round(sum(p.numel() for p in decoder.parameters()) / 1e6, 2) == 156.45
    # levels from the deepest: x2 (24->48), x2 (->96), x2 (->192), x1.75 (->336), none at level 0
    assert [getattr(up, "upsample", None) and up.upsample.scale_factor for up in decoder.up] == [None, 1.75, 2.0, 2.0, 2.0]
    assert [len(up.attn) for up in decoder.up] == [0, 0, 0, 0, 3]  # attention only at 24x24
    assert decoder.mid.attn_1.num_heads == 8


def test_attention_equals_reference_formula():
    torch.manual_seed(0)
    for heads in (1, 4):
        block = AttnBlock(64, heads)
        x = torch.randn(2, 64, 6, 6)
        torch.testing.assert_close(block(x), _reference_multi_head_attention(block, x), rtol=1e-5, atol=1e-5)


def test_resnet_block_formula():
    torch.manual_seed(1)
    block = ResnetBlock(32, 64)
    x = torch.randn(1, 32, 5, 5)
    h = block.conv2(F.silu(block.norm2(block.conv1(F.silu(block.norm1(x))))))
    torch.testing.assert_close(block(x), block.nin_shortcut(x) + h)


def test_small_decoder_shapes_and_nearest_upsample():
    torch.manual_seed(2)
    config = DecoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=0, z_channels=8, num_attn_head=2,
                           attn_resolutions=(6,), initial_resolution=6, resolution=21)
    decoder = Decoder(config).eval()
    with torch.no_grad():
        out = decoder(torch.randn(2, 8, 6, 6))
    assert out.shape == (2, 3, 21, 21) and torch.isfinite(out).all()
    assert decoder.up[1].upsample.scale_factor == 3.5
    assert len(decoder.up[0].attn) == 0  # the resolution after the last upsample is 21, not 6
