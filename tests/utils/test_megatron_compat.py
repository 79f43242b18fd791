"""Each megatron-core defect of ``libra_megatron/utils/megatron_compat.py`` reproduced on the unpatched upstream
code, and its workaround shown to work. When a new megatron-core fixes a defect, its ``test_defect_*`` fails
with the message saying so: then set that defect's ``fixed_in`` and delete the workaround."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from packaging.version import Version

from libra_megatron.utils import megatron_compat
from libra_megatron.utils.megatron_compat import DEFECTS, Defect
from tests.distributed import run_on_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fixed_upstream(name: str) -> str:
    return (f"megatron-core {megatron_compat.installed_version()} no longer shows defect '{name}' "
            f"({DEFECTS[name].summary}): set DEFECTS['{name}'].fixed_in in libra_megatron/utils/megatron_compat.py "
            "and remove its workaround")


def test_every_defect_has_a_detecting_test_and_the_version_gate_works():
    tests = {name[len("test_defect_"):] for name in globals() if name.startswith("test_defect_")}
    assert tests == set(DEFECTS), "each megatron_compat.DEFECTS entry needs a test_defect_<name> here"
    defect = Defect("x", "y", affected_since="0.12.0", fixed_in="0.21.0")
    assert defect.active(Version("0.19.2")) and defect.active(Version("0.20.1rc1"))
    assert not defect.active(Version("0.21.0")) and not defect.active(Version("0.11.3"))
    assert Defect("x", "y", affected_since="0.12.0").active(Version("9.0"))
    assert all(d.active() for d in DEFECTS.values()), "every known defect applies to the installed version"


# -- dist_checkpointing's results queue ---------------------------------------------------------------------------
def _write_queue_in_daemon_process():
    import multiprocessing
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert multiprocessing.current_process().daemon
    saved, filesystem_async._results_queue = filesystem_async._results_queue, None
    try:
        try:
            filesystem_async.get_write_results_queue()
            upstream = "ok"
        except AssertionError as error:  # "daemonic processes are not allowed to have children"
            upstream = str(error)
        filesystem_async._results_queue = None
        megatron_compat.use_in_process_write_queue()
        ours = type(filesystem_async.get_write_results_queue()) is queue.Queue
    finally:
        filesystem_async._results_queue = saved
    return upstream, ours


def test_defect_manager_write_queue():
    ((upstream, ours),) = run_on_ranks(_write_queue_in_daemon_process, world_size=1)
    assert "daemonic" in upstream, fixed_upstream("manager_write_queue")
    assert ours


# -- the distributed optimizer on torch's AdamW ------------------------------------------------------------------
def _tiny_model_and_distributed_optimizer():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=32, max_sequence_length=8,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config, ddp, model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True,
                                                       params_dtype=torch.float32), [model])
    return model, optimizer


def _take_steps(model, optimizer, steps: int) -> None:
    for _ in range(steps):
        for param in model.parameters():
            param.main_grad.add_(torch.randn_like(param.main_grad))
        optimizer.step()
        model.zero_grad_buffer()


def _fresh_optimizer_state_dict():
    torch.manual_seed(0)
    _, chained = _tiny_model_and_distributed_optimizer()
    (optimizer,) = getattr(chained, "chained_optimizers", [chained])
    try:
        optimizer.state_dict()
        upstream = "ok"
    except AssertionError:
        upstream = "assert"
    megatron_compat.ensure_adam_state(optimizer)
    state = optimizer.state_dict()
    inner = optimizer.optimizer.state
    return upstream, state["optimizer"]["param_groups"][0]["step"], sorted({float(s["step"]) for s in inner.values()})


def test_defect_adam_step_on_fresh_optimizer():
    ((upstream, group_step, steps),) = run_on_ranks(_fresh_optimizer_state_dict, world_size=1)
    assert upstream == "assert", fixed_upstream("adam_step_on_fresh_optimizer")
    assert group_step == 0 and steps == [0.0]


def _load_step_defects():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    torch.manual_seed(0)
    model, chained = _tiny_model_and_distributed_optimizer()
    (optimizer,) = getattr(chained, "chained_optimizers", [chained])
    assert isinstance(optimizer, DistributedOptimizer)
    _take_steps(model, chained, 3)
    saved = chained.state_dict()
    found = {}
    # 1. plain load_state_dict: one step tensor shared by every parameter
    chained.load_state_dict(saved)
    found["shared_step"] = len({id(s["step"]) for s in optimizer.optimizer.state.values()}) == 1
    # 2. and 3. the per-parameter loader: KeyError on the missing 'step', in-place copy into a leaf requiring grad
    model_param = next(iter(optimizer.model_param_group_index_map))
    group, order = optimizer.model_param_group_index_map[model_param]
    main = optimizer.optimizer.param_groups[group]["params"][order]
    state = optimizer.optimizer.state[main]
    tensors = {"param": main.detach().clone(), "exp_avg": state["exp_avg"].clone(),
               "exp_avg_sq": state["exp_avg_sq"].clone()}
    try:
        with torch.no_grad():
            optimizer._set_main_param_and_optimizer_states(model_param, tensors)
        found["missing_step"] = False
    except KeyError:
        found["missing_step"] = True
    try:
        optimizer._set_main_param_and_optimizer_states(model_param, dict(tensors, step=state["step"].clone()))
        found["grad_leaf"] = False
    except RuntimeError as error:
        found["grad_leaf"] = "requires grad" in str(error)
    # the workaround: own step tensors, valued as saved; the loader wrapper does not outlive the call
    megatron_compat.load_optimizer_state(chained, saved)
    steps = [s["step"] for s in optimizer.optimizer.state.values()]
    found["own_steps"] = len({id(s) for s in steps}) == len(steps) > 1
    found["values"] = sorted({float(s) for s in steps})
    found["unwrapped"] = "_set_main_param_and_optimizer_states" not in vars(optimizer)
    return found


def test_defect_distopt_load_step():
    ((found,),) = [run_on_ranks(_load_step_defects, world_size=1)]
    for part in ("shared_step", "missing_step", "grad_leaf"):
        assert found[part], fixed_upstream("distopt_load_step") + f" (part: {part})"
    assert found["own_steps"] and found["values"] == [3.0] and found["unwrapped"]


# -- batched p2p at interleaved PP=2 on gloo ---------------------------------------------------------------------
def _interleaved_losses(batch_p2p_comm: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    vocab, seq, micro_batches = 32, 8, 4
    config = TransformerConfig(
        num_layers=4, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, batch_p2p_comm=batch_p2p_comm)
    first, last = ps.is_pipeline_first_stage(ignore_virtual=True), ps.is_pipeline_last_stage(ignore_virtual=True)
    chunks = []
    for vp_stage in range(2):
        torch.manual_seed(10 + 10 * ps.get_pipeline_model_parallel_rank() + vp_stage)
        model_parallel_cuda_manual_seed(10 + vp_stage)
        chunks.append(GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=vocab,
                               max_sequence_length=seq, pre_process=first and vp_stage == 0,
                               post_process=last and vp_stage == 1, position_embedding_type="rope",
                               share_embeddings_and_output_weights=False, vp_stage=vp_stage))
    data = torch.randint(0, vocab, (micro_batches, 1, seq + 1), generator=torch.Generator().manual_seed(3))

    def forward_step(iterator, model):
        tokens = next(iterator)
        positions = torch.arange(seq).unsqueeze(0)
        output = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(data), iter(data)], model=chunks,
        num_microbatches=micro_batches, seq_length=seq, micro_batch_size=1, forward_only=False)
    return [float(r["loss"]) for r in reports] if last else None


def test_defect_gloo_batched_p2p_same_peer():
    assert not megatron_compat.batch_p2p_comm_is_safe(2, 2, "gloo")
    assert megatron_compat.batch_p2p_comm_is_safe(2, 2, "nccl") and megatron_compat.batch_p2p_comm_is_safe(4, 2, "gloo")
    assert megatron_compat.batch_p2p_comm_is_safe(2, None, "gloo")
    unbatched = [r for r in run_on_ranks(_interleaved_losses, world_size=2, pp=2, vpp=2, args=(False,)) if r][0]
    batched = [r for r in run_on_ranks(_interleaved_losses, world_size=2, pp=2, vpp=2, args=(True,)) if r][0]
    assert len(unbatched) == 4
    assert not torch.allclose(torch.tensor(batched), torch.tensor(unbatched), rtol=0, atol=1e-6), \
        fixed_upstream("gloo_batched_p2p_same_peer")


# -- import-time notices -----------------------------------------------------------------------------------------
def test_defect_import_time_fallback_notices():
    """One fresh interpreter: record what importing megatron-core warns, then check our filters drop exactly the
    fallback notices among them (the first matching entry of ``warnings.filters`` decides, as in ``warnings``)."""
    code = (
        "import re, warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    import megatron.core.optimizer, megatron.core.models.gpt, megatron.core.dist_checkpointing\n"
        "from libra_megatron.utils.megatron_compat import silence_fallback_notices\n"
        "silence_fallback_notices()\n"
        "for w in seen:\n"
        "    text = str(w.message)\n"
        "    action = next((f[0] for f in warnings.filters if (f[1] is None or f[1].match(text))\n"
        "                   and issubclass(w.category, f[2])), 'default')\n"
        "    print(action, '|', text.splitlines()[0] if text else '')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO).stdout
    lines = [line.split(" | ", 1) for line in out.splitlines() if " | " in line]
    notices = [(action, text) for action, text in lines if text.startswith(megatron_compat.FALLBACK_NOTICES[:2])]
    assert notices, fixed_upstream("import_time_fallback_notices")
    assert all(action == "ignore" for action, _ in notices), notices


# -- the checkpoint writer's lost exception ------------------------------------------------------------------------
_FAILED_WRITE = """
import errno, inspect, os, queue, sys, tempfile
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from libra_megatron.utils import megatron_compat

def failed_write():
    results = queue.Queue()
    missing = os.path.join(tempfile.mkdtemp(), "no-such-folder", "shard.distcp")  # ENOENT, as ENOSPC would be
    FileSystemWriterAsync.write_preloaded_data_multithread([], False, 0, [(missing, "key", ([], []))], results)
    return results.get()

upstream = failed_write()
print("upstream", type(upstream).__name__, getattr(upstream, "errno", None), "No such file" in str(upstream))
before = len(inspect.signature(FileSystemWriterAsync.write_preloaded_data).parameters)
megatron_compat.record_shard_write_errors()
megatron_compat.record_shard_write_errors()  # installed once
failed_write()
errors = megatron_compat.take_shard_write_errors()
after = len(inspect.signature(FileSystemWriterAsync.write_preloaded_data).parameters)
print("recorded", len(errors), type(errors[0]).__name__, errors[0].errno == errno.ENOENT, before == after,
      megatron_compat.take_shard_write_errors() == [])
"""


def test_defect_writer_drops_write_error():
    out = subprocess.run([sys.executable, "-c", _FAILED_WRITE], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("upstream", "recorded")))
    assert "upstream" in lines, out.stdout + out.stderr
    assert lines["upstream"] == "RuntimeError None False", fixed_upstream("writer_drops_write_error")
    # the workaround: the writer's own FileNotFoundError with its errno; megatron's signature check still sees 7
    assert lines.get("recorded") == "1 FileNotFoundError True True True", out.stdout + out.stderr


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_workarounds_are_off_once_fixed(name, monkeypatch):
    """With ``fixed_in`` at or below the installed version, the gate turns the workaround off."""
    installed = megatron_compat.installed_version()
    fixed = Defect(name, DEFECTS[name].summary, DEFECTS[name].affected_since, fixed_in=installed.base_version)
    monkeypatch.setitem(DEFECTS, name, fixed)
    assert not megatron_compat.active(name)
    if name == "gloo_batched_p2p_same_peer":
        assert megatron_compat.batch_p2p_comm_is_safe(2, 2, "gloo")


def test_adam_step_tensors_sit_where_torch_adam_keeps_them():
    """Fused/capturable Adam keeps ``step`` on the parameter's device (a CPU step makes ``_fused_adamw_`` fail on
    CUDA); the other implementations keep a CPU scalar. ``meta`` stands in for a CUDA parameter."""
    param = torch.empty(3, device="meta")
    assert megatron_compat._adam_step({"fused": True}, param, 4.0).device.type == "meta"
    assert megatron_compat._adam_step({"capturable": True, "fused": None}, param, 4.0).device.type == "meta"
    step = megatron_compat._adam_step({"fused": None, "foreach": True}, param, 4.0)
    assert step.device.type == "cpu" and step.dtype == torch.float32 and float(step) == 4.0
