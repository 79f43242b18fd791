"""The indexed sample format: lossless pixels, byte packing, lengths from the .idx, and the numpy merge that
must equal megatron-core's own ``IndexedDatasetBuilder.add_index``."""
import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from libra_megatron.data.indexed import (
    SampleReader,
    effective_lengths,
    merge_indexed,
    pack_bytes,
    sample_token_lengths,
    unpack_bytes,
)
from libra_megatron.data.pixel_codec import PIXEL_FORMATS, decode_pixels, encode_pixels
from libra_megatron.data.samples import assemble
from libra_megatron.tokenizer.image_processing import to_model_pixels
from tests.data.corpus import make_image
from tests.data.synthetic import SMALL_VOCAB, write_synthetic


@pytest.mark.parametrize("pixel_format", PIXEL_FORMATS)
def test_stored_pixels_decode_to_exactly_the_model_pixels(pixel_format):
    photo_like = to_model_pixels(make_image(123, 77, "RGB", 5))
    noise = torch.randint(0, 256, (3, 336, 336), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for pixels in (photo_like, noise, torch.zeros(3, 336, 336, dtype=torch.uint8)):
        data = encode_pixels(pixels, pixel_format)
        assert torch.equal(decode_pixels(data, pixel_format, 336), pixels)
    if pixel_format != "raw":
        assert len(encode_pixels(photo_like, pixel_format)) < 3 * 336 * 336 // 2


def test_pixel_codec_errors():
    with pytest.raises(ValueError, match="uint8"):
        encode_pixels(np.zeros((3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown pixel format"):
        encode_pixels(np.zeros((3, 4, 4), dtype=np.uint8), "jpeg")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("length", [0, 1, 2, 3, 1001])
def test_pack_unpack_bytes(dtype, length):
    data = bytes(np.random.default_rng(length).integers(0, 256, size=length, dtype=np.uint8))
    packed = pack_bytes(data, dtype)
    assert packed.dtype == dtype and unpack_bytes(packed) == data


def test_lengths_from_the_index_match_assembled_samples(tmp_path):
    prefix = str(tmp_path / "syn")
    write_synthetic(prefix, 40, seed=0, max_text=700, max_images=3)
    reader = SampleReader(prefix)
    full = sample_token_lengths(reader, SMALL_VOCAB)
    truncated = effective_lengths(reader, SMALL_VOCAB, 1000)
    assert (full > 1000).any() and (full <= 1000).any()
    for i in range(len(reader)):
        pieces = reader.pieces(i)
        assert assemble(pieces, SMALL_VOCAB, 10**6).length == full[i]
        assert assemble(pieces, SMALL_VOCAB, 1000).length == truncated[i]


def test_merge_is_byte_identical_to_megatron_add_index(tmp_path):
    prefixes = []
    for n, count in enumerate([5, 0, 9]):
        prefixes.append(str(tmp_path / f"part{n}"))
        write_synthetic(prefixes[-1], count, seed=n, dataset=n)
    merge_indexed(prefixes, str(tmp_path / "ours"), np.uint16)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16, multimodal=True)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
    merged = SampleReader(str(tmp_path / "ours"))
    assert len(merged) == 14
    first = SampleReader(prefixes[2]).pieces(3)
    for (mode_a, a), (mode_b, b) in zip(merged.pieces(5 + 3), first, strict=True):
        assert mode_a == mode_b and np.array_equal(a, b)
    with pytest.raises(ValueError, match="dtype"):
        merge_indexed(prefixes, str(tmp_path / "bad"), np.int32)
