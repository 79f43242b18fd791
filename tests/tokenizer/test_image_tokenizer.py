"""ImageTokenizer (docs/architecture.md#clip-features, docs/architecture.md#lfq-quantiser): encoder features and ids against a straightforward composition on the tiny
random CLIP, fused-vs-unfused projection bound, kernel-vs-reference packing, decode, files (safetensors round trip,
released vqgan.ckpt import with weights-only unpickling)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from libra_megatron.ops import lfq as lfq_ops
from libra_megatron.tokenizer.clip_encoder import TINY_CLIP
from libra_megatron.tokenizer.image_tokenizer import CONFIG_NAME, WEIGHTS_NAME, ImageTokenizer
from libra_megatron.vocab import LIBRA_VOCAB


@pytest.fixture(scope="module")
def tokenizer():
    return ImageTokenizer.tiny(seed=0)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def encoded(tokenizer, pixels):
    return tokenizer.encode(pixels)


@pytest.fixture(scope="module")
def full_clip(tokenizer):
    """A full 24-block CLIP whose first 22 blocks are the tokenizer's (blocks 23-24 random, never used)."""
    torch.manual_seed(9)
    tower = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    tower.load_state_dict(tokenizer.encoder.vision_tower.state_dict(), strict=False)
    return tower


def test_tiny_geometry(tokenizer, encoded):
    codes, features = encoded
    assert tokenizer.feature_size == 128 and tokenizer.num_patches == 576 and tokenizer.grid == 24
    assert tokenizer.encoder.select_layers == (2, 10, 18, 22)
    assert len(tokenizer.encoder.vision_tower.encoder.layers) == 22  # blocks 23-24 are not built
    assert codes.shape == (2, 3, 576) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 512 and len(codes.unique()) > 100
    assert features.shape == (3, 576, 128) and features.dtype == torch.float32


def test_tiny_is_deterministic_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    a, b = ImageTokenizer.tiny(seed=1), ImageTokenizer.tiny(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_features_equal_full_clip_forward(tokenizer, pixels, encoded, full_clip):
    """Straightforward composition: full CLIP forward with output_hidden_states, select [2,10,18,22], cat, drop CLS."""
    with torch.no_grad():
        out = full_clip(pixels, output_hidden_states=True)
    assert len(out.hidden_states) == 25
    expected = torch.cat([out.hidden_states[i] for i in (2, 10, 18, 22)], dim=-1)[:, 1:]
    assert torch.equal(encoded[1], expected)
    assert torch.equal(tokenizer.clip_features(pixels), expected)


def test_ids_equal_unfused_composition_up_to_rounding_at_zero(tokenizer, encoded):
    """Fused (one F->18 map) vs the reference composition (1x1 conv F->E, project_in E->18, then signs).

    The two differ only by float32 rounding, so ids may differ only where some |u| is within that rounding of 0.
    Stated bound: |u_fused - u_unfused| <= 1e-5 * (1 + max|u|); ids must agree at every patch whose 18 logits all
    exceed that bound in magnitude, and such ambiguous patches must be rare (< 1%).
    """
    codes, features = encoded
    n = features.size(0)
    with torch.no_grad():
        square = features.view(n, 24, 24, -1).permute(0, 3, 1, 2)
        z = tokenizer.quant_conv(square).permute(0, 2, 3, 1).reshape(n, 576, -1)
        u_unfused = tokenizer.quantize.project_in(z)
        logits, bias = tokenizer.code_logits(features)
        u_fused = logits + bias
    tolerance = 1e-5 * (1 + u_unfused.abs().max().item())
    assert (u_fused - u_unfused).abs().max().item() <= tolerance
    reference = tokenizer.reference_codes(features)
    certain = (u_unfused.abs() > tolerance).all(-1).unsqueeze(0).expand_as(reference)  # [2, N, 576]
    assert torch.equal(codes[certain], reference[certain])
    assert (~certain).float().mean().item() < 0.01


def test_kernel_path_equals_reference_packing(tokenizer, pixels, encoded, monkeypatch):
    monkeypatch.setattr(lfq_ops, "get_extension", lambda: None)
    codes, features = tokenizer.encode(pixels)
    assert torch.equal(codes, encoded[0]) and torch.equal(features, encoded[1])
    logits, bias = tokenizer.code_logits(features)
    assert torch.equal(encoded[0], lfq_ops.lfq_codes_reference(logits, 2, bias).permute(2, 0, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encode_matches_reference_packing_and_cpu(tokenizer, pixels, encoded):
    model = ImageTokenizer.tiny(seed=0).cuda()
    codes, features = model.encode(pixels.cuda())
    logits, bias = model.code_logits(features)
    assert torch.equal(codes, lfq_ops.lfq_codes_reference(logits, 2, bias).permute(2, 0, 1))
    torch.testing.assert_close(features.cpu(), encoded[1], rtol=1e-3, atol=1e-3)
    assert (codes.cpu() == encoded[0]).float().mean() > 0.99  # GPU vs CPU rounding may flip near-zero logits


def test_encode_tokens_is_the_vocab_span(tokenizer, pixels, encoded):
    spans, features = tokenizer.encode_tokens(pixels)
    assert torch.equal(spans, LIBRA_VOCAB.image_span(encoded[0]))
    assert torch.equal(features, encoded[1])


def test_empty_batches(tokenizer):
    codes, features = tokenizer.encode(torch.zeros(0, 3, 336, 336))
    assert codes.shape == (2, 0, 576) and features.shape == (0, 576, 128)
    assert tokenizer.encode_tokens(torch.zeros(0, 3, 336, 336))[0].shape == (2, 0, 578)
    assert tokenizer.decode(codes).shape == (0, 3, 336, 336)


def test_decode_shape_range_and_tokens(tokenizer, encoded):
    codes = encoded[0][:, :1]
    images = tokenizer.decode(codes)
    assert images.shape == (1, 3, 336, 336) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    assert torch.equal(tokenizer.decode_tokens(LIBRA_VOCAB.image_span(codes)), images)
    with pytest.raises(ValueError, match="codes must be"):
        tokenizer.decode(codes[:, :, :575])
    with pytest.raises(ValueError, match="<boi>"):
        tokenizer.decode_tokens(LIBRA_VOCAB.image_span(codes).flip(-1))


def test_autoencoder_forward_trains_everything_but_clip(tokenizer, pixels):
    model = ImageTokenizer.tiny(seed=0).train()
    reconstruction, aux_loss, breakdown, codes = model(pixels[:1])
    assert reconstruction.shape == (1, 3, 336, 336) and codes.shape == (2, 1, 576)
    (reconstruction.abs().mean() + aux_loss).backward()
    assert model.quant_conv.weight.grad is not None and model.decoder.conv_out.weight.grad is not None
    assert model.quantize.project_in.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())
    assert torch.equal(codes, tokenizer.encode(pixels[:1])[0])  # same ids as encode (identical weights)


def test_bf16_tokenizer_encodes(tokenizer, pixels):
    model = ImageTokenizer.tiny(seed=0).to(torch.bfloat16)
    codes, features = model.encode(pixels[:1])
    assert features.dtype == torch.bfloat16 and codes.shape == (2, 1, 576)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model.clip_features(pixels[:, :, :224, :224])


def test_save_load_round_trip_is_exact(tokenizer, pixels, encoded, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = ImageTokenizer.from_pretrained(tmp_path)
    original, restored = tokenizer.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype for k in original)
    codes, features = loaded.encode(pixels)
    assert torch.equal(codes, encoded[0]) and torch.equal(features, encoded[1])
    assert torch.equal(loaded.quantize.codebook, tokenizer.quantize.codebook)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["clip"]["num_hidden_layers"] == 22 and config["select_layers"] == [2, 10, 18, 22]


def test_from_pretrained_errors_name_the_file(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=CONFIG_NAME):
        ImageTokenizer.from_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["embed_dimension"] = 3
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown fields.*embed_dimension"):
        ImageTokenizer.from_pretrained(tmp_path)
    del config["embed_dimension"]
    config["embed_dim"] = 32
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}.*shape mismatch"):
        ImageTokenizer.from_pretrained(tmp_path)


def _released_folder(tokenizer: ImageTokenizer, folder, extra_object=None, as_safetensors=False):
    """A folder laid out like the released one, holding the tiny tokenizer in the reference's key names."""
    state = {}
    for key, value in tokenizer.state_dict().items():
        if key.startswith("encoder.vision_tower."):
            key = "encoder.vision_tower.vision_model." + key[len("encoder.vision_tower."):]
        state[key] = value.clone()
    torch.manual_seed(4)
    extra_blocks = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).state_dict()
    for key, value in extra_blocks.items():
        if key.startswith(("encoder.layers.22.", "encoder.layers.23.")):
            state["encoder.vision_tower.vision_model." + key] = value
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 1, 1)
    state["quantize.mask"] = 2 ** torch.arange(8, -1, -1)
    state["encoder.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    ckpt_name = "vqgan.safetensors" if as_safetensors else "vqgan.ckpt"
    if as_safetensors:
        save_file(state, os.path.join(folder, ckpt_name))
    else:
        payload = {"state_dict": state, "epoch": 3, "global_step": 1000}
        if extra_object is not None:
            payload["callbacks"] = extra_object
        torch.save(payload, os.path.join(folder, ckpt_name))
    clip_dir = os.path.join(folder, "openai-clip-vit-large-patch14-336")
    os.makedirs(clip_dir, exist_ok=True)
    with open(os.path.join(clip_dir, "config.json"), "w") as handle:
        json.dump({"model_type": "clip", "vision_config": TINY_CLIP, "text_config": {"hidden_size": 8}}, handle)
    ddconfig = dict(encoder_name="openai-clip-vit-large-patch14-336", select_layer=[2, 10, 18, 22], double_z=False,
                    z_channels=64, resolution=336, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2], num_res_blocks=0,
                    attn_resolutions=[24], dropout=0.0, initial_resolution=24, num_attn_head=2)
    config = {"freeze": True, "max_vision_token_length": 578,
              "params": {"embed_dim": 64, "ckpt_path": ckpt_name, "codebook_size": 512, "num_codebook": 2, "ddconfig": ddconfig}}
    with open(os.path.join(folder, "vision_tokenizer_config.yaml"), "w") as handle:
        yaml.safe_dump(config, handle)


class _NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("as_safetensors", [False, True])
def test_from_released_maps_the_reference_checkpoint(tokenizer, pixels, encoded, tmp_path, as_safetensors):
    _released_folder(tokenizer, tmp_path, as_safetensors=as_safetensors)
    loaded = ImageTokenizer.from_released(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tokenizer.state_dict().items())
    assert torch.equal(loaded.encode(pixels)[0], encoded[0])


def test_from_released_refuses_arbitrary_pickles(tokenizer, tmp_path, capsys):
    _released_folder(tokenizer, tmp_path, extra_object=_NotATensor())
    with pytest.raises(ValueError, match=r"refusing to load .*vqgan\.ckpt.*weights_only=True.*vqgan\.safetensors"):
        ImageTokenizer.from_released(tmp_path)
    assert "this must never run" not in capsys.readouterr().out


def test_from_released_config_errors(tmp_path):
    with pytest.raises(ValueError, match="vision_tokenizer_config.yaml"):
        ImageTokenizer.from_released(tmp_path)
    (tmp_path / "vision_tokenizer_config.yaml").write_text("params:\n  embed_dim: 8\n")
    with pytest.raises(ValueError, match="params.ddconfig"):
        ImageTokenizer.from_released(tmp_path)
