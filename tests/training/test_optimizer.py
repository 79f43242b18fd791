"""Fused AdamW and the device-side gradient norm/clipping (libra_megatron/training/optimizer.py).

- FusedAdamW equals torch's foreach AdamW over 5 steps (two param groups, with and without weight decay, the
  trainer's betas) to fp32 round-off, and continues an unfused optimizer's state exactly like the unfused one.
- The multi-tensor norm/scale equal megatron's per-tensor fallbacks, and megatron's clipping with them does no
  device-to-host read at all (counted as ``aten::_local_scalar_dense``, the op behind every ``.item()``,
  ``float(t)`` and ``bool(t)``), where megatron's fallback reads the norm back (and, on CUDA, every per-tensor
  norm); the trainer's one read per step is logging the grad norm.
- A checkpoint written by the trainer with megatron's plain torch AdamW and clipping (the code before this
  change) loads into the fused trainer and resumes: the first resumed loss is bit-identical, the next ones equal
  the unfused continuation to fp32 round-off; at DP=1 and with the distributed optimizer at DP=2.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from libra_megatron.ops import multi_tensor
from libra_megatron.training.optimizer import FusedAdamW
from tests.distributed import run_on_ranks
from tests.training.helpers import losses, make_args

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,), (16, 8)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _params(seed: int, device: str = "cpu") -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g).to(device)) for shape in SHAPES]


def _groups(params):
    return [{"params": params[0::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}]


def _run(optimizer, params, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        optimizer.step()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_matches_foreach_adamw_over_five_steps(device):
    fused_params, foreach_params = _params(0, device), _params(0, device)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    fused = FusedAdamW(_groups(fused_params), **kwargs)
    reference = torch.optim.AdamW(_groups(foreach_params), foreach=True, **kwargs)
    _run(fused, fused_params, 5, seed=1)
    _run(reference, foreach_params, 5, seed=1)
    assert fused.param_groups[0]["fused"] is True
    for a, b, start in zip(fused_params, foreach_params, _params(0, device)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
        assert not torch.equal(a, start), "the parameters must have moved"
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[a][key], reference.state[b][key], rtol=2e-6, atol=1e-9)
        assert float(fused.state[a]["step"]) == float(reference.state[b]["step"]) == 5.0
    assert fused.state_dict()["state"].keys() == reference.state_dict()["state"].keys()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_continues_unfused_state_like_the_unfused_optimizer(device):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    old_params = _params(2, device)
    old = torch.optim.AdamW(_groups(old_params), **kwargs)  # megatron's construction: no fused/foreach flag
    _run(old, old_params, 3, seed=3)
    saved = copy.deepcopy(old.state_dict())  # as read from a file: no tensor shared with `old`
    new_params = [torch.nn.Parameter(p.detach().clone()) for p in old_params]
    new = FusedAdamW(_groups(new_params), **kwargs)
    new.load_state_dict(saved)
    assert all(g["fused"] is True for g in new.param_groups)
    steps = [new.state[p]["step"] for p in new_params]
    assert len({id(s) for s in steps}) == len(steps), "each parameter needs its own step tensor"
    assert all(s.device == p.device for s, p in zip(steps, new_params))
    _run(old, old_params, 2, seed=4)
    _run(new, new_params, 2, seed=4)
    for a, b in zip(new_params, old_params):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
        assert float(new.state[a]["step"]) == 5.0


def test_fused_adamw_refuses_l2_mode_adam():
    with pytest.raises(ValueError, match="decoupled weight decay"):
        FusedAdamW(_params(0), adam_w_mode=False)


class _HostReads(TorchDispatchMode):
    """Counts ``aten::_local_scalar_dense``: every read of a tensor value by the host goes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _grads(seed: int, device: str = "cpu") -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * 3).to(device) for shape in SHAPES] + [torch.zeros(0, device=device)]


@pytest.mark.parametrize("device", DEVICES)
def test_multi_tensor_norm_and_scale_equal_megatron_fallbacks(device):
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    grads = _grads(5, device)
    flag = torch.zeros(1, dtype=torch.int, device=device)
    ours, per_tensor = multi_tensor.multi_tensor_l2norm(0, flag, [grads], True)
    with _cpu_device_literal():
        theirs, _ = local_multi_tensor_l2_norm(0, flag, [grads], False)
    torch.testing.assert_close(ours, theirs.reshape(1).to(device), rtol=1e-6, atol=0)
    torch.testing.assert_close(per_tensor, torch.stack([g.norm() for g in grads]), rtol=1e-6, atol=0)
    expected = [g * 0.25 for g in grads]
    copies = [g.clone() for g in grads]
    local_multi_tensor_scale(0, flag, [grads, copies], 0.25)
    scaled = [g.clone() for g in grads]
    multi_tensor.multi_tensor_scale(0, flag, [scaled, scaled], 0.25)
    multi_tensor.multi_tensor_scale_tensor(0, flag, [grads, grads], torch.tensor([0.25], device=device))
    for e, c, s, t in zip(expected, copies, scaled, grads):
        assert torch.equal(e, c) and torch.equal(e, s) and torch.equal(e, t)


@contextlib.contextmanager
def _cpu_device_literal():
    """megatron's fallbacks write ``device='cuda'`` literally; on a CPU-only torch map it to the CPU."""
    from libra_megatron.utils.cpu import enable_cpu_megatron

    if not torch.cuda.is_available():
        enable_cpu_megatron()
    yield


def _clip_rank(use_ours: bool) -> Dict:
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core import parallel_state, utils

    saved = (clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
             clip_grads.multi_tensor_scale_tensor_impl)
    if use_ours:
        assert multi_tensor.install_into_megatron()
    else:
        clip_grads.multi_tensor_applier = utils.local_multi_tensor_applier
        clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
        clip_grads.multi_tensor_scale_impl = utils.local_multi_tensor_scale
        clip_grads.multi_tensor_scale_tensor_impl = None
    try:
        rank = torch.distributed.get_rank()
        grads = [g + rank for g in _grads(7)[:-1]]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        group = parallel_state.get_model_parallel_group()
        with _HostReads() as reads:
            norm = clip_grads.get_grad_norm_fp32([p.grad for p in params], grad_stats_parallel_group=group)
            clip_grads.clip_grad_by_total_norm_fp32(params, 1.0, norm)
        return {"norm": float(norm), "reads": reads.count, "grads": [p.grad.clone() for p in params]}
    finally:
        (clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
         clip_grads.multi_tensor_scale_tensor_impl) = saved


def test_grad_norm_and_clip_equal_megatron_with_no_host_read_at_tp2_pp2_dp2():
    ours = run_on_ranks(_clip_rank, world_size=8, tp=2, pp=2, args=(True,))
    theirs = run_on_ranks(_clip_rank, world_size=8, tp=2, pp=2, args=(False,))
    for mine, ref in zip(ours, theirs):
        assert mine["norm"] == pytest.approx(ref["norm"], rel=1e-6)
        for a, b in zip(mine["grads"], ref["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert mine["reads"] == 0, "norm + clip must not read any value on the host"
        # megatron's fallback reads the total twice (float(norm), .item()); its per-tensor reads
        # (torch.tensor(list_of_norms)) are device-to-host syncs only on CUDA, where each is counted too.
        assert ref["reads"] >= 2, "the counter must see megatron's host reads"


BASE = ["--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size", "4", "--clip-grad", "0.05"]


@contextlib.contextmanager
def _code_before_this_change():
    """The trainer as before: megatron's plain ``torch.optim.AdamW`` and per-tensor fallback clipping."""
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core import utils

    from libra_megatron.training import model_setup

    saved_ctx = model_setup.fused_optimizer_kernels
    saved = (clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
             clip_grads.multi_tensor_scale_tensor_impl)
    model_setup.fused_optimizer_kernels = contextlib.nullcontext
    clip_grads.multi_tensor_applier = utils.local_multi_tensor_applier
    clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
    clip_grads.multi_tensor_scale_impl = utils.local_multi_tensor_scale
    clip_grads.multi_tensor_scale_tensor_impl = None
    try:
        yield
    finally:
        model_setup.fused_optimizer_kernels = saved_ctx
        (clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
         clip_grads.multi_tensor_scale_tensor_impl) = saved


def _train(flags: List[str], world_size: int, old_code: bool):
    from libra_megatron.training.loop import pretrain

    loads = []
    original = FusedAdamW.load_state_dict

    def counting_load(self, state_dict):
        loads.append(1)
        original(self, state_dict)

    FusedAdamW.load_state_dict = counting_load
    try:
        with _code_before_this_change() if old_code else contextlib.nullcontext():
            history = pretrain(make_args(BASE + flags, world_size))
    finally:
        FusedAdamW.load_state_dict = original
    from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER

    assert USING_PYTORCH_OPTIMIZER, "the hook must restore megatron's module state"
    assert bool(loads) == (not old_code and "--load" in flags), "the fused optimizer must load the old state"
    return history


@pytest.mark.parametrize("world_size,extra", [(1, []), (2, ["--use-distributed-optimizer"])],
                         ids=["dp1", "dp2_distopt"])
def test_checkpoint_written_before_loads_and_resumes(tmp_path, world_size, extra):
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "2"]
    run_on_ranks(_train, world_size=world_size, args=(extra + save + ["--train-iters", "2"], world_size, True))
    resume = extra + ["--load", str(tmp_path / "ckpt"), "--ckpt-step", "2"]
    old = losses(run_on_ranks(_train, world_size=world_size, args=(resume, world_size, True)))
    new = losses(run_on_ranks(_train, world_size=world_size, args=(resume, world_size, False)))
    assert len(old) == len(new) == 2, (old, new)
    assert new[0] == old[0], "the first resumed loss depends only on the loaded weights"
    torch.testing.assert_close(torch.tensor(new), torch.tensor(old), rtol=1e-6, atol=0)
