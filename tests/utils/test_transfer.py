"""libra_megatron/utils/transfer.py: host -> device copies."""
from __future__ import annotations

import pytest
import torch

from libra_megatron.utils.transfer import to_device_async


def test_cpu_targets_return_the_same_tensor():
    x = torch.arange(6)
    assert to_device_async(x, None) is x
    assert to_device_async(x, "cpu") is x
    assert to_device_async(x, torch.device("cpu")) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pageable_tensor_is_pinned_and_copied_exactly():
    x = torch.randn(1000)
    y = to_device_async(x, "cuda")
    assert y.is_cuda and torch.equal(y.cpu(), x)
    assert to_device_async(y, "cuda") is y
