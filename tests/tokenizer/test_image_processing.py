"""Preprocessing equals the reference pipeline bit for bit (docs/architecture.md#image-preprocessing): the reference's ``convert("RGB")``,
``expand2square`` with the CLIP-mean colour, then transformers' CLIP image processor with the CLIP-336 settings
(PIL backend, which is the 4.38 code path the reference ran).

Finding recorded here: the split uint8 -> normalise composition is *bit-identical* to the processor's output
(max difference 0.0), because the processor also resizes in uint8 (PIL) before rescaling in float64 -> float32.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from libra_megatron.tokenizer import image_processing as ip

try:  # transformers >= 5: the PIL backend explicitly (the default backend needs torchvision and resizes differently)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as _Processor
except ImportError:  # transformers 4.x: the slow processor is the PIL one
    from transformers import CLIPImageProcessor as _Processor


@pytest.fixture(scope="module")
def clip_processor():
    """transformers' CLIP processor configured as openai/clip-vit-large-patch14-336 (no download)."""
    return _Processor(
        do_resize=True, size={"shortest_edge": 336}, resample=3, do_center_crop=True,
        crop_size={"height": 336, "width": 336}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(ip.CLIP_MEAN), image_std=list(ip.CLIP_STD), do_convert_rgb=True,
    )


def _reference_expand2square(img: Image.Image, background) -> Image.Image:
    """The reference ``expand2square`` (laion_dataset.py), transcribed."""
    width, height = img.size
    if width == height:
        return img
    if width > height:
        result = Image.new(img.mode, (width, width), background)
        result.paste(img, (0, (width - height) // 2))
        return result
    result = Image.new(img.mode, (height, height), background)
    result.paste(img, ((height - width) // 2, 0))
    return result


def _image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """A natural-ish test image: smooth gradients plus noise, converted to ``mode``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    rgb = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "I;16":
        return Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))  # 16-bit grey, PIL clips it to 255
    if mode in ("RGBA", "LA"):
        out = img.convert(mode)
        out.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return out
    return img.convert(mode)


SIZES = [(336, 336), (500, 375), (375, 500), (37, 100), (1024, 683), (337, 335), (1, 7), (64, 64)]
MODES = ["RGB", "L", "RGBA", "P", "CMYK", "LA", "I;16", "I", "F", "1"]


@pytest.mark.parametrize("mode", MODES)
def test_preprocess_equals_reference_pipeline(clip_processor, mode):
    for index, (width, height) in enumerate(SIZES):
        img = _image(width, height, mode, seed=index)
        reference_input = _reference_expand2square(img.convert("RGB"), ip.PAD_COLOR)
        expected = clip_processor(reference_input, return_tensors="pt")["pixel_values"][0]
        pixels = ip.to_model_pixels(img)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 336, 336)
        ours = ip.normalize_pixels(pixels)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, expected), f"{mode} {width}x{height}: max diff {(ours - expected).abs().max()}"
        assert torch.equal(ip.preprocess_image(img), ours)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (37, 100), (1024, 683), (337, 335), (5, 400)])
def test_without_padding_resize_rounding_and_crop_match(clip_processor, size):
    """The non-padded path exercises the shortest-edge rounding and the centre crop of the processor."""
    img = _image(*size, "RGB", seed=3)
    expected = clip_processor(img, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ip.normalize_pixels(ip.to_model_pixels(img, pad_to_square=False)), expected)


def test_shortest_edge_size_matches_transformers():
    from transformers.image_transforms import get_resize_output_image_size

    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (336, 336), (1, 5000), (5000, 1), *rng.integers(1, 3000, (200, 2)).tolist()]:
        dummy = np.zeros((3, height, width), dtype=np.uint8)
        expected = get_resize_output_image_size(dummy, 336, default_to_square=False, input_data_format="channels_first")
        assert ip.shortest_edge_size(height, width) == tuple(expected), (height, width)


def test_normalize_is_bit_identical_for_every_pixel_value(clip_processor):
    values = torch.arange(256, dtype=torch.uint8)
    pixels = values.view(1, 1, 256).expand(3, 336, 256).contiguous()
    pixels = torch.cat([pixels, pixels[..., :80]], dim=-1)  # 336 wide
    array = pixels.numpy().astype(np.float64) * (1 / 255)
    expected = clip_processor.normalize(array.astype(np.float32), ip.CLIP_MEAN, ip.CLIP_STD)
    assert torch.equal(ip.normalize_pixels(pixels), torch.from_numpy(np.ascontiguousarray(expected)))
    batch = torch.stack([pixels, pixels.flip(-1)])
    assert torch.equal(ip.normalize_pixels(batch)[1], ip.normalize_pixels(pixels.flip(-1)))


def test_pad_colour_and_placement():
    assert ip.PAD_COLOR == (122, 116, 104)
    wide = Image.new("RGB", (40, 10), (255, 0, 0))
    square = ip.expand_to_square(wide)
    assert square.size == (40, 40)
    arr = np.asarray(square)
    assert (arr[15:25] == (255, 0, 0)).all() and (arr[:15] == ip.PAD_COLOR).all() and (arr[25:] == ip.PAD_COLOR).all()
    tall = ip.expand_to_square(Image.new("RGB", (9, 20), (0, 255, 0)))
    assert np.asarray(tall)[:, 5:14].tolist() == np.asarray(_reference_expand2square(Image.new("RGB", (9, 20), (0, 255, 0)), ip.PAD_COLOR))[:, 5:14].tolist()


def test_unit_range_helpers_round_trip():
    pixels = torch.randint(0, 256, (2, 3, 336, 336), dtype=torch.uint8)
    unit = ip.normalized_to_unit_range(ip.normalize_pixels(pixels))
    assert unit.min() >= -1.0001 and unit.max() <= 1.0001
    assert torch.equal(ip.unit_range_to_pixels(unit), pixels)


def test_bad_inputs_are_reported(tmp_path):
    with pytest.raises(TypeError, match="PIL"):
        ip.to_model_pixels(np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        ip.normalize_pixels(torch.zeros(3, 336, 336))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        ip.normalize_pixels(torch.zeros(4, 336, 336, dtype=torch.uint8))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        ip.load_image(broken)
    good = tmp_path / "good.png"
    buffer = io.BytesIO()
    _image(30, 20, "RGBA", 0).save(buffer, format="PNG")
    good.write_bytes(buffer.getvalue())
    assert ip.to_model_pixels(ip.load_image(good)).shape == (3, 336, 336)
