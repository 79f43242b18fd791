"""Incremental decoding (libra_megatron/model/kv_cache.py): prefill the prompt, then feed one text position per
step with the cached text key/value set — the logits equal the full forward's at every decoded position (1e-5), on
both routing plans; image positions cannot be fed to a decode step."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_on_ranks


def _cached_vs_full(force_index_plan: bool):
    from libra_megatron.model.kv_cache import LibraKVCache
    from tests.model.helpers import build_model, hf_weights, load_hf, make_batch, tiny_config, tiny_sizes

    config = tiny_config(512, force_general_routing=force_index_plan)
    model = build_model(config)
    load_hf(model, hf_weights(tiny_sizes(512)), config)
    model.eval()
    batch = make_batch("image_mid", T=512)  # text, image, text (same layout in both rows)
    tokens, vis, pos, clip = batch["tokens"], batch["vision_indices"], batch["position_ids"], batch["clip_features"]
    prompt = int((vis < 578).nonzero()[:, 1].max()) + 2  # through <eoi> and one text position
    with torch.no_grad():
        full = model(tokens, vis, pos, clip_features=clip)  # [C, B, L, V]
        cache = LibraKVCache()
        cache.keep = prompt
        steps = [model(tokens[:, :, :prompt], vis[:, :prompt], pos[:, :prompt], clip_features=clip, kv_cache=cache)
                 [:, :, -1]]
        cache.keep = 1
        for t in range(prompt, tokens.shape[2]):
            steps.append(model(tokens[:, :, t:t + 1], vis[:, t:t + 1], pos[:, t:t + 1], kv_cache=cache)[:, :, 0])
        offsets = {cache.offset(n) for n in cache.layers()}
        with pytest.raises(ValueError, match="text positions only"):
            image = slice(5, 5 + 578)  # the image span of "image_mid"
            model(tokens[:, :, image], vis[:, image], pos[:, image], clip_features=clip, kv_cache=cache)
    cached = torch.stack(steps, dim=2)
    expected = full[:, :, prompt - 1:]
    assert (vis[:, prompt:] == 578).all() and cached.shape == expected.shape and cached.shape[2] > 2
    finite = expected.isfinite()  # the unified logits hold -inf where a head does not serve the position
    assert torch.equal(finite, cached.isfinite()) and finite.sum() > 0
    error = (cached - expected)[finite].abs().max() / expected[finite].abs().max()
    return float(error), offsets, len(cache.layers()), tokens.shape[2]


@pytest.mark.parametrize("force_index_plan", [False, True], ids=["segment_plan", "index_plan"])
def test_kv_cache_decode_equals_full_forward(force_index_plan):
    error, offsets, layers, length = run_on_ranks(_cached_vs_full, world_size=1, args=(force_index_plan,))[0]
    assert error <= 1e-5, error
    assert offsets == {length} and layers >= 2


@pytest.mark.parametrize("capacity", [None, 6, 64], ids=["grow", "tight", "roomy"])
def test_kv_cache_buffer_keeps_the_first_keep_positions_of_every_step(capacity):
    from libra_megatron.model.kv_cache import LibraKVCache

    cache, kept_k, kept_v = LibraKVCache(capacity), [], []
    gen = torch.Generator().manual_seed(0)
    for step, (length, keep) in enumerate([(5, 5), (2, 1), (1, 1), (3, 1), (1, 1), (4, 2)]):
        k, v = torch.randn(length, 2, 3, 4, generator=gen), torch.randn(length, 2, 3, 4, generator=gen)
        cache.keep = keep
        k_all, v_all = cache.extend(7, k, v)
        # what attention sees: everything kept so far, then the whole step (padding included)
        assert torch.equal(k_all, torch.cat(kept_k + [k])) and torch.equal(v_all, torch.cat(kept_v + [v]))
        kept_k.append(k[:keep])
        kept_v.append(v[:keep])
        k_mem, v_mem = cache.keys_values(7)
        assert torch.equal(k_mem, torch.cat(kept_k)) and torch.equal(v_mem, torch.cat(kept_v))
        assert cache.offset(7) == sum(x.shape[0] for x in kept_k)
    assert cache.layers() == [7] and not cache.has(8) and cache.offset(8) == 0
