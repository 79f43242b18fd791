"""The C++ extension loads, matches its PyTorch fallbacks, and reports a missing or stale build clearly."""
import types

import pytest
import torch

from libra_megatron.ops import extension, lfq


def test_extension_is_built_and_current():
    import libra_megatron._C as compiled

    assert extension.get_extension() is compiled
    assert compiled.with_openmp
    assert "loaded" in extension.extension_status()


@pytest.mark.parametrize("shape", [(1, 18), (7, 576, 18), (3, 5, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_lfq_kernel_equals_fallback(shape, dtype):
    codebooks = 2
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    x.view(-1)[::5] = 0.0
    x.view(-1)[1::7] = -0.0
    x.view(-1)[2::11] = float("nan")
    expected = lfq.lfq_codes_reference(x, codebooks)
    assert torch.equal(extension.get_extension().lfq_codes(x, codebooks), expected)
    assert expected.max() < 2 ** (shape[-1] // codebooks)


def test_dispatch_uses_the_fallback_without_extension(monkeypatch):
    x = torch.randn(4, 18)
    monkeypatch.setattr(lfq, "get_extension", lambda: None)
    assert torch.equal(lfq.lfq_codes(x, 2), lfq.lfq_codes_reference(x, 2))


def test_stale_build_message_names_the_fix(monkeypatch):
    stale = types.SimpleNamespace(csrc_hash="0000000000000000")
    message = extension._problem_with(stale, None)
    assert "stale" in message and "make install" in message


def test_missing_build_message_and_required_mode(monkeypatch):
    message = extension._problem_with(None, ImportError("No module named 'libra_megatron._C'"))
    assert "not built" in message and "pip install --no-build-isolation -e ." in message
    monkeypatch.setattr(extension, "_load", lambda: (None, message))
    monkeypatch.setenv("LIBRA_REQUIRE_EXTENSION", "1")
    with pytest.raises(extension.ExtensionUnavailableError, match="not built"):
        extension.get_extension()
