"""The Libra image tokenizer: frozen CLIP features -> LFQ ids (encode) and ids -> images (decode), docs/architecture.md#image-tokenizer.

Encode, per image (336x336, CLIP-normalised)::

    F = concat(CLIP blocks [2, 10, 18, 22])[patches]     [N, 576, 4096]   (clip_features; the model's continuous input)
    u = project_in(quant_conv(F))                        [N, 576, 18]     (two 1x1 affine maps, fused into one)
    ids[c, n, p] = sum_k [u[n, p, 9c + k] > 0] * 2^(8-k) [2, N, 576]      (csrc kernel, bit-identical to torch)

Because only signs of ``u`` matter, ``encode`` applies ``quant_conv`` and ``project_in`` as one 4096 -> 18 map
``W = Wp @ Wq`` (float64 product, kept in float32), ``b = Wp @ bq + bp``; the GEMM ``F @ W^T`` runs in float32 in
torch and the kernel adds ``b`` and packs the signs. This *fused path is the definition* of our ids. It is not
bit-identical to running the two maps one after the other (different rounding): the ids agree except where
``|u|`` is within float32 rounding of 0 (``tests/tokenizer/test_image_tokenizer.py`` bounds the difference).
The reference itself tokenised in bf16 during training and in fp32 in its demo (docs/architecture.md#reference-defects (B8)), so ids of
near-zero logits were never stable across its own runs either.

Files: :meth:`save_pretrained` writes ``vision_tokenizer.safetensors`` + ``vision_tokenizer_config.json`` (names
that cannot clash with an HF model's files in the same folder); :meth:`from_released` reads the released
``vision_tokenizer_config.yaml`` + ``vqgan.ckpt`` (see :mod:`libra_megatron.tokenizer.released`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from libra_megatron.ops.lfq import image_token_ids, lfq_image_ids
from libra_megatron.tokenizer.clip_encoder import LIBRA_SELECT_LAYERS, TINY_CLIP, VIT_L14_336, ClipFeatureEncoder
from libra_megatron.tokenizer.decoder import Decoder, DecoderConfig
from libra_megatron.tokenizer.lfq import LFQ
from libra_megatron.tokenizer.released import read_released
from libra_megatron.vocab import LIBRA_VOCAB, LibraVocab

WEIGHTS_NAME = "vision_tokenizer.safetensors"
CONFIG_NAME = "vision_tokenizer_config.json"
FORMAT_VERSION = 1
_ENCODE_CHUNK = 32  # images per fused-GEMM chunk (bounds the float32 copy of bf16 features)


@dataclass
class ImageTokenizerConfig:
    """Everything needed to rebuild an :class:`ImageTokenizer` (stored as ``vision_tokenizer_config.json``)."""

    clip: Dict[str, Any] = field(default_factory=lambda: dict(VIT_L14_336))
    select_layers: Tuple[int, ...] = LIBRA_SELECT_LAYERS
    embed_dim: int = 1024
    codebook_size: int = 512
    num_codebooks: int = 2
    decoder: Dict[str, Any] = field(default_factory=lambda: DecoderConfig().to_dict())

    def to_dict(self) -> Dict[str, Any]:
        values = asdict(self)
        values["select_layers"] = list(self.select_layers)
        values["format_version"] = FORMAT_VERSION
        return values

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "ImageTokenizerConfig":
        """Build from a dict, naming ``source`` and the field in any error."""
        version = values.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: field 'format_version' is {version}, this code reads {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known - {"format_version"}
        if unknown:
            raise ValueError(f"{source}: unknown fields {sorted(unknown)}")
        kwargs = {k: v for k, v in values.items() if k in known}
        if "select_layers" in kwargs:
            kwargs["select_layers"] = tuple(int(v) for v in kwargs["select_layers"])
        for key in ("clip", "decoder"):
            if key in kwargs and not isinstance(kwargs[key], dict):
                raise ValueError(f"{source}: field {key!r} must be a mapping, got {type(kwargs[key]).__name__}")
        return cls(**kwargs)


class ImageTokenizer(nn.Module):
    """CLIP encoder + LFQ (+ decoder) of Libra. Module names follow the released ``vqgan.ckpt``."""

    def __init__(self, config: Optional[ImageTokenizerConfig] = None):
        super().__init__()
        config = config or ImageTokenizerConfig()
        self.encoder = ClipFeatureEncoder(config.clip, config.select_layers)
        # Store the depth actually built (blocks past max(select_layers) are never computed nor stored).
        self.config = config = replace(config, clip=dict(config.clip, num_hidden_layers=self.encoder.config.num_hidden_layers))
        decoder_config = DecoderConfig.from_dict(config.decoder)
        self.quant_conv = nn.Conv2d(self.encoder.feature_size, config.embed_dim, 1)
        self.quantize = LFQ(config.embed_dim, config.codebook_size, config.num_codebooks)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, decoder_config.z_channels, 1)
        self.decoder = Decoder(decoder_config)
        self._fused_cache: Optional[tuple] = None

    # ----------------------------------------------------------------------------------------------- geometry
    @property
    def feature_size(self) -> int:
        """Channels of the continuous CLIP features (4096 for Libra, 128 for ``tiny``)."""
        return self.encoder.feature_size

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches

    @property
    def grid(self) -> int:
        return self.encoder.config.image_size // self.encoder.config.patch_size

    @property
    def image_size(self) -> int:
        return self.encoder.config.image_size

    @property
    def num_codebooks(self) -> int:
        return self.quantize.num_codebooks

    def frozen(self) -> "ImageTokenizer":
        """Freeze every parameter and switch to eval mode (how training uses the tokenizer); returns self."""
        self.requires_grad_(False)
        return self.eval()

    # ------------------------------------------------------------------------------------------------- encode
    def clip_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised ``[N, 3, 336, 336]`` -> ``[N, 576, F]`` (frozen, no grad, stops after block 22)."""
        return self.encoder(pixel_values.to(self.encoder.vision_tower.dtype))

    def fused_projection(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W [C*D, F], b [C*D])`` of ``project_in(quant_conv(x))``, float32, recomputed when the weights change."""
        params = (self.quant_conv.weight, self.quant_conv.bias, self.quantize.project_in.weight, self.quantize.project_in.bias)
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        if self._fused_cache is None or self._fused_cache[0] != key:
            with torch.no_grad():
                wq = self.quant_conv.weight.double().flatten(1)  # [E, F]
                wp = self.quantize.project_in.weight.double()  # [C*D, E]
                weight = (wp @ wq).float()
                bias = (wp @ self.quant_conv.bias.double() + self.quantize.project_in.bias.double()).float()
            self._fused_cache = (key, weight, bias)
        return self._fused_cache[1], self._fused_cache[2]

    def code_logits(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features ``[N, P, F]`` -> ``(F @ W^T in float32 [N, P, C*D], bias b)``; ``u = logits + b`` (fused path)."""
        weight, bias = self.fused_projection()
        # Full float32 products even where a training script allowed TF32 (its 10-bit mantissa would flip many
        # more near-zero signs); the GEMM is 18 columns wide, so precision costs nothing here.
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            chunks = [
                torch.matmul(features[i : i + _ENCODE_CHUNK].float(), weight.t())
                for i in range(0, features.size(0), _ENCODE_CHUNK)
            ]
        finally:
            torch.set_float32_matmul_precision(precision)
        logits = torch.cat(chunks) if chunks else features.new_zeros((0, features.size(1), weight.size(0)), dtype=torch.float32)
        return logits, bias

    @torch.no_grad()
    def codes_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``[N, P, F]`` -> code ids ``[C, N, P]`` in ``0..K-1`` (fused path + csrc packing)."""
        logits, bias = self.code_logits(features)
        return lfq_image_ids(logits, self.num_codebooks, bias)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """CLIP-normalised ``[N, 3, 336, 336]`` -> ``(codes long [C, N, 576] in 0..K-1, clip_features [N, 576, F])``."""
        features = self.clip_features(pixel_values)
        return self.codes_from_features(features), features

    @torch.no_grad()
    def encode_tokens(
        self, pixel_values: torch.Tensor, vocab: LibraVocab = LIBRA_VOCAB
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`encode` but returns model-space image spans ``[C, N, 578]`` (``<boi>`` codes+offset ``<eoi>``)."""
        features = self.clip_features(pixel_values)
        logits, bias = self.code_logits(features)
        return image_token_ids(logits, bias, vocab), features

    @torch.no_grad()
    def reference_codes(self, features: torch.Tensor) -> torch.Tensor:
        """The unfused reference composition ``(project_in(quant_conv(F)) > 0)`` packed MSB first -> ``[C, N, P]``."""
        n, p, f = features.shape
        grid = int(round(p**0.5))
        square = features.view(n, grid, grid, f).permute(0, 3, 1, 2)  # reference reshape_to_square
        z = self.quant_conv(square.to(self.quant_conv.weight.dtype))  # [N, E, g, g]
        u = self.quantize.project_in(z.permute(0, 2, 3, 1).reshape(n, p, -1))
        bits = (u.unflatten(-1, (self.num_codebooks, self.quantize.codebook_dim)) > 0).long()
        return (bits * self.quantize.mask).sum(-1).permute(2, 0, 1).contiguous()

    # ------------------------------------------------------------------------------------------------- decode
    def _latents_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        c, n, p = codes.shape
        if c != self.num_codebooks or p != self.num_patches:
            raise ValueError(f"codes must be [{self.num_codebooks}, N, {self.num_patches}], got {tuple(codes.shape)}")
        latents = self.quantize.indices_to_codes(codes.permute(1, 2, 0))  # [N, P, E]
        return latents.view(n, self.grid, self.grid, latents.size(-1)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids ``[C, N, 576]`` (0..K-1) -> images ``[N, 3, 336, 336]`` clamped to [-1, 1]."""
        latents = self._latents_from_codes(codes.to(self.post_quant_conv.weight.device))
        return self.decoder(self.post_quant_conv(latents)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode_tokens(self, ids: torch.Tensor, vocab: LibraVocab = LIBRA_VOCAB) -> torch.Tensor:
        """Model-space image spans ``[C, N, 578]`` (with ``<boi>``/``<eoi>``) -> images ``[N, 3, 336, 336]``."""
        if ids.dim() != 3 or ids.size(-1) != vocab.image_positions:
            raise ValueError(f"image spans must be [C, N, {vocab.image_positions}], got {tuple(ids.shape)}")
        if not (bool((ids[..., 0] == vocab.boi_id).all()) and bool((ids[..., -1] == vocab.eoi_id).all())):
            raise ValueError("image spans must start with <boi> and end with <eoi>")
        return self.decode(ids[..., 1:-1] - vocab.image_offset)

    def forward(self, pixel_values: torch.Tensor):
        """Autoencoder pass for tokenizer training: ``(reconstruction [N,3,S,S] unclamped, aux_loss, breakdown, codes)``.

        Gradients reach quant_conv, the LFQ projections, post_quant_conv and the decoder (CLIP stays frozen);
        the reconstruction target is ``image_processing.normalized_to_unit_range(pixel_values)``.
        """
        features = self.clip_features(pixel_values)
        n, p, f = features.shape
        weight = self.quant_conv.weight.flatten(1)
        z = nn.functional.linear(features.to(weight.dtype), weight, self.quant_conv.bias)  # 1x1 conv per patch
        quantized, indices, aux_loss, breakdown = self.quantize(z)
        latents = quantized.view(n, self.grid, self.grid, quantized.size(-1)).permute(0, 3, 1, 2)
        reconstruction = self.decoder(self.post_quant_conv(latents))
        return reconstruction, aux_loss, breakdown, indices.permute(2, 0, 1)

    # ------------------------------------------------------------------------------------------------ files
    def weights_sha256(self) -> str:
        """Identity digest of the weights (sorted keys, dtype, raw bytes): what a dataset's sidecar records as
        ``image_tokenizer.weights_sha256`` and what training checks the tokenizer it loads against."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        """Write ``vision_tokenizer.safetensors`` and ``vision_tokenizer_config.json`` into ``folder`` (atomically)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        weights_tmp = os.path.join(folder, WEIGHTS_NAME + ".tmp")
        save_file(tensors, weights_tmp, metadata={"format": "pt", "libra_vision_tokenizer": str(FORMAT_VERSION)})
        config_tmp = os.path.join(folder, CONFIG_NAME + ".tmp")
        with open(config_tmp, "w", encoding="utf-8") as handle:
            json.dump(self.config.to_dict(), handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(weights_tmp, os.path.join(folder, WEIGHTS_NAME))
        os.replace(config_tmp, os.path.join(folder, CONFIG_NAME))

    @classmethod
    def from_pretrained(
        cls, folder: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None
    ) -> "ImageTokenizer":
        """Load what :meth:`save_pretrained` wrote (exact round trip); eval mode, ``dtype`` optional."""
        folder = os.fspath(folder)
        config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
        try:
            with open(config_path, encoding="utf-8") as handle:
                values = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the vision tokenizer config {config_path!r}: {exc}") from exc
        config = ImageTokenizerConfig.from_dict(values, source=config_path)
        with torch.device("meta"):
            model = cls(config)
        if not os.path.isfile(weights_path):
            raise ValueError(f"vision tokenizer weights {weights_path!r} are missing")
        state = load_file(weights_path, device=str(device))
        _load_exact(model, state, weights_path)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    @classmethod
    def from_released(
        cls,
        folder: Union[str, os.PathLike],
        clip_folder: Optional[Union[str, os.PathLike]] = None,
        device: Union[str, torch.device] = "cpu",
    ) -> "ImageTokenizer":
        """Load the released ``vision_tokenizer_config.yaml`` + ``vqgan.ckpt`` (``weights_only`` unpickling only)."""
        fields, state, weights_path = read_released(folder, clip_folder=clip_folder)
        with torch.device("meta"):
            model = cls(ImageTokenizerConfig(**fields))
        _load_exact(model, {k: v.to(device) for k, v in state.items()}, weights_path)
        return model.eval()

    @classmethod
    def tiny(cls, seed: int = 0) -> "ImageTokenizer":
        """A tiny random tokenizer with the real geometry (336 px, 24x24 patches, layers [2,10,18,22]) for tests/demo.

        CLIP hidden 32 (features 4 x 32 = 128-d), LFQ 2 x 9 bits over a 64-d latent, a 3-level decoder (ch 32).
        """
        config = ImageTokenizerConfig(
            clip=dict(TINY_CLIP),
            embed_dim=64,
            decoder=DecoderConfig(
                ch=32, ch_mult=(1, 1, 2), num_res_blocks=0, z_channels=64, num_attn_head=2, attn_resolutions=(24,)
            ).to_dict(),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
        return model.eval()


def _load_exact(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(assign=True)`` that names ``source`` and the offending keys or shapes on mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: shape mismatch (file vs model) {bad[:8]}")
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers were created on the meta device: rebuild them on the weights' device.
    device = next(iter(state.values())).device if state else torch.device("cpu")
    for module in model.modules():
        if isinstance(module, LFQ):
            module.mask = 2 ** torch.arange(module.codebook_dim - 1, -1, -1, device=device)
            module.codebook = module.bits_to_codes(module._code_bits(torch.arange(module.codebook_size, device=device)))
    _rebuild_meta_buffers(model, device)


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Re-create non-persistent buffers left on ``meta`` (e.g. CLIP's ``position_ids``)."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name == "position_ids":
                    module._buffers[name] = torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone()
                else:
                    raise ValueError(f"buffer {name!r} of {type(module).__name__} was not restored from the weights")
