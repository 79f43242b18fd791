"""CUDA graphs of the layers (``config.layer_cuda_graphs``) give the eager step's loss and gradients, and only run
where they are correct. The replay test needs a GPU (bench/gpu_check_layer.sh runs it); the applicability rules are
checked on CPU."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.model.helpers import make_batch


def _graphed_vs_eager():
    from tests.model.helpers import build_model, hf_weights, load_hf, local_grads, model_inputs, tiny_config, tiny_sizes

    results = {}
    batches = [make_batch("bos_image_caption", seed=s) for s in range(3)]  # same layout, different ids
    for graphs in (False, True):
        config = tiny_config(layer_cuda_graphs=graphs, use_cpu_initialization=True)
        model = build_model(config)
        load_hf(model, hf_weights(tiny_sizes()), config)
        model = model.cuda()
        model.set_training_stage("pretrain")
        losses, grads = [], None
        for batch in batches:  # the first call captures, the next ones replay
            model.zero_grad()
            inputs = {k: v.cuda() if isinstance(v, torch.Tensor) and k not in ("vision_indices", "segment_ids")
                      else v for k, v in model_inputs(batch).items()}
            loss = model(**inputs)
            loss.sum().backward()
            losses.append(loss.detach().cpu())
            grads = {k: (n, g.cpu()) for k, (n, g) in local_grads(model, config).items()}
        results[graphs] = (losses, grads, len(getattr(model.decoder, "_libra_layer_graphs", None).graphs)
                           if graphs else 0)
    return results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_eager_on_cuda() -> None:
    (results,) = run_on_ranks(_graphed_vs_eager, world_size=1)
    (eager_losses, eager_grads, _), (graph_losses, graph_grads, captured) = results[False], results[True]
    assert captured == 1  # one layout, one capture, replayed for the later micro-batches
    for got, want in zip(graph_losses, eager_losses):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for key, (_, want) in eager_grads.items():
        torch.testing.assert_close(graph_grads[key][1], want, rtol=1e-5, atol=1e-6)


def _applicability():
    from libra_megatron.model.cuda_graphs import LayerGraphs
    from libra_megatron.model.micro_batch import build_micro_batch_routing
    from tests.model.helpers import tiny_config

    config = tiny_config(layer_cuda_graphs=True)
    uniform = make_batch("bos_image_caption")
    mixed = make_batch("mixed_offsets")
    out = {}
    on_cuda = SimpleNamespace(is_cuda=True)  # what applicable() reads of the stream: a stand-in CUDA tensor
    for name, batch in (("uniform", uniform), ("mixed", mixed)):
        routing = build_micro_batch_routing(config, batch["vision_indices"], batch["position_ids"])
        out[name] = LayerGraphs.applicable(config, routing, torch.zeros(1), training=True)
        out[f"{name}_cuda"] = LayerGraphs.applicable(config, routing, on_cuda, training=True)
        fused = tiny_config(layer_cuda_graphs=True, gradient_accumulation_fusion=True)
        out[f"{name}_cuda_fused_wgrad"] = LayerGraphs.applicable(fused, routing, on_cuda, training=True)
    return out


def test_graphs_apply_only_to_cuda_uniform_layouts_without_fused_wgrad() -> None:
    (out,) = run_on_ranks(_applicability, world_size=1)
    assert out == {"uniform": False, "mixed": False,  # CPU tensors: always eager
                   "uniform_cuda": True, "mixed_cuda": False,
                   "uniform_cuda_fused_wgrad": False, "mixed_cuda_fused_wgrad": False}


def test_training_flag_reaches_the_config_and_bad_combinations_are_refused() -> None:
    from libra_megatron.training.arguments import ConfigError, parse_args, validate_args
    from libra_megatron.training.data_stream import dataset_files
    from libra_megatron.training.families import get_family

    def validated(*extra: str):
        args = parse_args(["--model", "tiny", "--mock-data", "--image-tokenizer", "tiny", "--train-iters", "1",
                           "--layer-cuda-graphs", *extra])
        family = get_family(args.model_family)
        return family, args, validate_args(args, 2, family.shape(args), dataset_files)

    graphable = ("--no-gradient-accumulation-fusion", "--sequence-padding", "fixed")
    family, args, run = validated(*graphable)
    assert family.build_config(run).layer_cuda_graphs is True
    with pytest.raises(ConfigError, match="needs --no-gradient-accumulation-fusion"):
        validated("--sequence-padding", "fixed")
    with pytest.raises(ConfigError, match="needs --sequence-padding fixed"):
        validated("--no-gradient-accumulation-fusion")
    for extra, message in [(("--tensor-model-parallel-size", "2"), "needs --tensor- and --pipeline"),
                           (("--recompute-granularity", "full"), "does not combine with --recompute"),
                           (("--use-distributed-optimizer", "--overlap-param-gather"), "--overlap-param-gather")]:
        with pytest.raises(ConfigError, match=message):
            validated(*graphable, *extra)
