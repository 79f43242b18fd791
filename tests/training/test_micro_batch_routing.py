"""One routing per micro-batch: the data path builds (and validates) each micro-batch's ``ModalityRouting`` once,
and every model chunk, pipeline stage and the loss use that object — counted over a PP=2 x VPP=2 training step."""
from __future__ import annotations

from typing import Dict, List

from tests.distributed import run_on_ranks
from tests.training.helpers import make_args

FLAGS = [
    "--model-family", "libra", "--model", "tiny", "--num-layers", "4", "--seq-length", "600",
    "--image-tokenizer", "tiny:0", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "1",
    "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
]


def _count_builds() -> Dict[str, object]:
    from libra_megatron.model import libra_model
    from libra_megatron.model.routing import ModalityRouting
    from libra_megatron.training.loop import pretrain

    built: List[ModalityRouting] = []
    used: List[ModalityRouting] = []
    original_build = ModalityRouting.build.__func__
    original_forward = libra_model.LibraModel.forward

    def counting_build(cls, *args, **kwargs):
        routing = original_build(cls, *args, **kwargs)
        built.append(routing)
        return routing

    def recording_forward(self, *args, routing=None, **kwargs):
        used.append(routing)
        return original_forward(self, *args, routing=routing, **kwargs)

    ModalityRouting.build = classmethod(counting_build)
    libra_model.LibraModel.forward = recording_forward
    history = pretrain(make_args(FLAGS, 2))
    return dict(builds=len(built), built_ids=[id(r) for r in built], used_ids=[id(r) for r in used],
                checked=all(r.inputs_checked for r in built), logged=bool(history and "lm_loss" in history[0]))


def test_routing_built_once_per_micro_batch_under_pp2_vpp2() -> None:
    results = run_on_ranks(_count_builds, world_size=2, pp=2, vpp=2)
    micro_batches = 8 // 2
    for rank in results:
        assert rank["builds"] == micro_batches, rank["builds"]  # not once per chunk (2 per rank) or per layer
        assert rank["checked"]
        # each rank runs 2 model chunks per micro-batch, forward only once each (no recompute), all with the
        # data path's object: the model never built its own
        assert len(rank["used_ids"]) == 2 * micro_batches
        assert set(rank["used_ids"]) == set(rank["built_ids"])
    assert any(rank["logged"] for rank in results)
