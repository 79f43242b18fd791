"""A tiny Libra config and mixed text/image inputs shared by the HF-modeling and checkpoint tests."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from libra_megatron.hf_modeling.configuration_libra import LibraConfig
from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM

TEXT_VOCAB, VISION_VOCAB, RESOLUTION = 64, 10, 2  # image = <boi> + 4 patches + <eoi> = 6 positions
IMAGE_LEN = RESOLUTION**2 + 2
BOI, EOI = TEXT_VOCAB + VISION_VOCAB - 2, TEXT_VOCAB + VISION_VOCAB - 1
NEWLINE = 13


def tiny_config(**overrides) -> LibraConfig:
    """2 layers, hidden 32, 4 heads, vision rank = out/4, bridge rank 2, CLIP signal 16."""
    fields = dict(vocab_size=TEXT_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, vision_vocab_size=VISION_VOCAB, image_feature_resolution=RESOLUTION,
                  max_vision_token_length=IMAGE_LEN, contiguous_signal_size=16, bridge_rank=2,
                  newline_token_id=NEWLINE, max_position_embeddings=128)
    fields.update(overrides)
    return LibraConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> LibraForCausalLM:
    """Random tiny model in eval mode with non-zero bridges (B is zero-initialised, so perturb it)."""
    torch.manual_seed(seed)
    model = LibraForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bridge" in name and name.endswith("weight_B"):
                param.normal_(0.0, 0.3)
    return model


def image_span(generator: torch.Generator, patches: Optional[int] = None) -> torch.Tensor:
    """[2, n] ids of one image (``patches`` < 4 gives a truncated image without <eoi>)."""
    n = RESOLUTION**2 if patches is None else patches
    codes = torch.randint(0, VISION_VOCAB - 2, (2, n), generator=generator) + TEXT_VOCAB
    span = [torch.full((2, 1), BOI), codes]
    if patches is None:
        span.append(torch.full((2, 1), EOI))
    return torch.cat(span, dim=1)


def mixed_batch(seed: int = 0, batch: int = 2, trailing_image_patches: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [2, B, L], vision_indices [B, L], CLIP signal [B, L, 16]: text, an image, "\\n", text (and optionally a
    truncated image at the end)."""
    g = torch.Generator().manual_seed(seed)
    rows_ids, rows_vi = [], []
    for _ in range(batch):
        parts = [torch.tensor([[1]] * 2), torch.randint(3, TEXT_VOCAB, (1, 2), generator=g).expand(2, -1),
                 image_span(g), torch.full((2, 1), NEWLINE), torch.randint(3, TEXT_VOCAB, (1, 3), generator=g).expand(2, -1)]
        vis = [torch.full((3,), IMAGE_LEN), torch.arange(IMAGE_LEN), torch.full((4,), IMAGE_LEN)]
        if trailing_image_patches is not None:
            parts.append(image_span(g, trailing_image_patches))
            vis.append(torch.arange(trailing_image_patches + 1))
        rows_ids.append(torch.cat(parts, dim=1))
        rows_vi.append(torch.cat(vis))
    ids, vi = torch.stack(rows_ids, dim=1), torch.stack(rows_vi)
    signal = torch.randn(batch, ids.shape[-1], 16, generator=g)
    patch = (vi >= 1) & (vi <= RESOLUTION**2)
    return ids, vi, signal * patch.unsqueeze(-1)


def random_weights(model: LibraForCausalLM, seed: int) -> LibraForCausalLM:
    """Every weight of ``model`` random (norms near 1, matrices with 1/sqrt(fan-in) scale, embeddings N(0, 1)), so
    no zero-initialised expert or bridge hides a conversion error; ``model`` in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 1.0 if "embed" in name else param.shape[1] ** -0.5)
    return model.eval()


def write_export(model: LibraForCausalLM, folder: str, dtype: torch.dtype = torch.bfloat16,
                 tokenizer_dir: Optional[str] = None) -> str:
    """``model`` written as an HF Libra folder (the engine's export writer); its path."""
    from libra_megatron.checkpoint.hf_libra import constant_buffers, write_hf_libra

    params = ((k, v) for k, v in model.state_dict().items() if k not in constant_buffers(model.config))
    return write_hf_libra(folder, model.config, params, tokenizer_dir=tokenizer_dir, dtype=dtype)


def sentencepiece_export(folder, dtype: torch.dtype = torch.bfloat16):
    """A 1-layer export with a trained 384-piece SentencePiece tokenizer and a tiny image tokenizer in ``folder``
    / "export" (the generation and evaluation tools' input); (export path, text tokenizer)."""
    from libra_megatron.data.sentencepiece_training import train_sentencepiece
    from libra_megatron.data.text_tokenizer import TextTokenizer
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    tokenizer = TextTokenizer(train_sentencepiece(folder / "tokenizer.model", vocab_size=384))
    config = LibraConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, contiguous_signal_size=128, bridge_rank=2)
    torch.manual_seed(0)
    out = write_export(LibraForCausalLM(config).eval(), str(folder / "export"), dtype, tokenizer_dir=str(folder))
    ImageTokenizer.tiny(seed=0).save_pretrained(out)
    return out, tokenizer
