"""HF import of any size: a random Libra of a size no preset has (hidden 96, 3 layers, vocab 1000, CLIP signal 32,
expert ratio 2, bridge rank 4), in the original HF layout, converts with ``tools/convert_checkpoint.py
hf-to-engine`` with the architecture read from its config.json; the engine reproduces the HF logits to 1e-5 in
fp32; the trainer starts from the converted checkpoint without ``--model`` and trains 2 steps; asking for another
architecture is refused naming every differing field."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from libra_megatron.checkpoint.safe_io import CheckpointError
from libra_megatron.hf_modeling.configuration_libra import LibraConfig
from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM
from tests.distributed import run_on_ranks
from tests.hf_modeling.tiny import random_weights, write_export
from tests.model.helpers import make_batch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = dict(vocab_size=1000, hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            contiguous_signal_size=32, vision_down_ratio=2, bridge_rank=4)
SIGNAL = SIZE["contiguous_signal_size"]


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_any_size", os.path.join(REPO, "tools",
                                                                                              "convert_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_hf(folder: str) -> LibraForCausalLM:
    model = random_weights(LibraForCausalLM(LibraConfig(**SIZE)), seed=7)
    write_export(model, folder, torch.float32)
    return model


def _image_tokenizer(folder: str) -> str:
    """A random tiny image tokenizer whose CLIP features are SIGNAL wide (4 selected layers x 8)."""
    from dataclasses import replace

    from libra_megatron.tokenizer.clip_encoder import TINY_CLIP
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    torch.manual_seed(0)
    config = replace(ImageTokenizer.tiny().config,
                     clip=dict(TINY_CLIP, hidden_size=SIGNAL // 4, intermediate_size=16, projection_dim=8))
    ImageTokenizer(config).save_pretrained(folder)
    return folder


def _batches():
    batches = []
    for layout, seed in (("image_mid", 3), ("text_only", 4)):
        batch = make_batch(layout, T=SIZE["vocab_size"], seed=seed)
        batch.pop("labels")
        images = int((batch["vision_indices"] == 0).sum())
        batch["clip_features"] = torch.randn(images, 576, SIGNAL, generator=torch.Generator().manual_seed(seed)) \
            if images else None
        batches.append(batch)
    return batches


def _engine_logits(root: str, batches):
    """TP=1 engine forward of the converted checkpoint, its architecture read back from the checkpoint."""
    from megatron.core import dist_checkpointing

    from libra_megatron.checkpoint.engine_checkpoint import (
        args_from_checkpoint,
        build_chunks,
        engine_config,
        resolve_checkpoint,
    )
    from libra_megatron.training.checkpointing import load_checkpoint

    path = resolve_checkpoint(root)
    args = args_from_checkpoint(dist_checkpointing.load_common_state_dict(path), path)
    config = engine_config(args)
    (model,) = build_chunks(args, config)
    load_checkpoint(path, [model], None, None, args, weights_only=True)
    model.eval()
    with torch.no_grad():
        return [model(b["tokens"], b["vision_indices"], b["position_ids"], clip_features=b["clip_features"]).clone()
                for b in batches]


def _train(argv):
    from libra_megatron.training.arguments import parse_args, validate_args
    from libra_megatron.training.data_stream import dataset_files
    from libra_megatron.training.families import get_family
    from libra_megatron.training.loop import pretrain

    args = parse_args(argv)
    family = get_family(args.model_family)
    args = validate_args(args, 1, family.shape(args), dataset_files)
    history = pretrain(args, family)
    return history, (args.model, args.hidden_size, args.num_layers, args.vocab_size, args.clip_feature_size,
                     args.vision_down_ratio, args.bridge_rank)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("any_size")
    hf = str(tmp / "hf")
    model = _random_hf(hf)
    engine = str(tmp / "engine")
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "hf-to-engine",
                           "--source", hf, "--output", engine], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, hf, model, engine


def test_architecture_comes_from_config_json_and_logits_match(converted):
    _, _, model, engine = converted
    with open(os.path.join(engine, "iter_0000000", "run_config.json")) as handle:
        recorded = json.load(handle)
    assert (recorded["hidden_size"], recorded["num_layers"], recorded["num_attention_heads"],
            recorded["ffn_hidden_size"], recorded["vocab_size"], recorded["clip_feature_size"],
            recorded["vision_down_ratio"], recorded["bridge_rank"], recorded["num_codebooks"],
            recorded["codebook_size"]) == (96, 3, 4, 256, 1000, 32, 2, 4, 2, 512)
    assert recorded["model"] is None
    batches = _batches()
    (engine_logits,) = run_on_ranks(_engine_logits, world_size=1, args=(engine, batches))
    for batch, want in zip(batches, engine_logits):
        signal = torch.zeros(*batch["vision_indices"].shape, SIGNAL)
        if batch["clip_features"] is not None:
            patch = (batch["vision_indices"] >= 1) & (batch["vision_indices"] <= 576)
            signal[patch] = batch["clip_features"].reshape(-1, SIGNAL)
        with torch.no_grad():
            got = model(input_ids=batch["tokens"], vision_indices=batch["vision_indices"],
                        position_ids=batch["position_ids"], contiguous_signal=signal).logits
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        error = float((got[finite] - want[finite]).abs().max())
        print(f"HF vs engine (non-preset size) logits: max abs diff {error:.2e}")
        assert error <= 1e-5 * max(1.0, float(want[finite].abs().max()))


def test_trains_two_steps_from_the_converted_checkpoint_without_model(converted):
    tmp, _, _, engine = converted
    tokenizer = _image_tokenizer(str(tmp / "image_tokenizer"))
    argv = ["--model-family", "libra", "--pretrained-checkpoint", engine, "--train-iters", "2", "--seq-length",
            "600", "--mock-data", "--image-tokenizer", tokenizer, "--micro-batch-size", "1", "--global-batch-size",
            "1", "--lr", "1e-3", "--lr-warmup-iters", "0", "--num-workers", "0", "--stage", "instruct",
            "--log-interval", "1", "--save", str(tmp / "trained")]
    ((history, resolved),) = run_on_ranks(_train, world_size=1, args=(argv,))
    assert resolved == (None, 96, 3, 1000, 32, 2, 4)
    assert [record["iteration"] for record in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(record["lm_loss"])) for record in history)
    with open(os.path.join(str(tmp / "trained"), "iter_0000002", "run_config.json")) as handle:
        assert json.load(handle)["hidden_size"] == 96


def test_a_different_architecture_is_refused_naming_every_field(converted):
    from libra_megatron.training.architecture import ArchitectureError, resolve_architecture
    from libra_megatron.training.arguments import parse_args

    tmp, hf, _, engine = converted
    tool = _tool()
    options = tool.parse_args(["hf-to-engine", "--source", hf, "--output", str(tmp / "unused"), "--model", "tiny"])
    with pytest.raises(CheckpointError) as refused:
        tool.validate_hf_to_engine(options)
    for field in ("num_layers=2", "hidden_size=64", "text_vocab_size=512", "clip_feature_size=128",
                  "vision_down_ratio=4", "bridge_rank=8", "ffn_hidden_size=176"):
        assert field in str(refused.value), (field, str(refused.value))
    options = tool.parse_args(["hf-to-engine", "--source", hf, "--output", str(tmp / "unused"), "--hidden-size", "96",
                               "--bridge-rank", "8", "--vocab-size", "999"])
    with pytest.raises(CheckpointError, match=r"\(2 fields: ") as refused:
        tool.validate_hf_to_engine(options)
    assert "bridge_rank=8 from --bridge-rank but 4" in str(refused.value)
    assert "text_vocab_size=999 from --vocab-size but 1000" in str(refused.value)
    with pytest.raises(ArchitectureError) as refused:
        resolve_architecture(parse_args(["--pretrained-checkpoint", engine, "--num-layers", "2", "--model", "tiny"]))
    assert "num_layers=2 from --num-layers" in str(refused.value) and "hidden_size=64 from --model tiny" in str(
        refused.value)
    agreeing = resolve_architecture(parse_args(["--pretrained-checkpoint", engine, "--hidden-size", "96"]))
    assert agreeing["hidden_size"] == 96 and agreeing["bridge_rank"] == 4
