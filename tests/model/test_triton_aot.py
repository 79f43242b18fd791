"""tests/model/triton_aot.py compiles kernels for sm_90 without a GPU, and refuses what only the interpreter runs.

The layer's own kernels are compiled by tests/model/test_fusions.py (from the launches its interpreter checks make);
this file shows the compile step can fail: a kernel that calls a plain Python function runs under
``TRITON_INTERPRET=1`` but is refused by the GPU compiler."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


def _double(x):  # a plain Python function: the interpreter calls it, the GPU compiler cannot
    return x * 2.0


@triton.jit
def interpreter_only_kernel(x_ptr, n, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    tl.store(x_ptr + cols, _double(tl.load(x_ptr + cols, mask=cols < n)), mask=cols < n)


@triton.jit
def compilable_kernel(x_ptr, n, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    tl.store(x_ptr + cols, tl.load(x_ptr + cols, mask=cols < n) * 2.0, mask=cols < n)


def _launch(kernel: str):
    return {"module": __name__, "kernel": kernel,
            "args": {"x_ptr": {"pointer": "fp32"}, "n": {"int": "i32"}, "BLOCK": {"constexpr": 16}}}


def test_compiles_a_good_kernel_for_sm90_in_bf16_and_the_recorded_dtype():
    from tests.model.triton_aot import compile_launches, signature

    assert compile_launches([_launch("compilable_kernel")]) == [f"{__name__}.compilable_kernel"]
    assert signature(_launch("compilable_kernel"), "bf16") == ({"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                                                               {"BLOCK": 16})


def test_refuses_a_kernel_only_the_interpreter_can_run():
    from tests.model.triton_aot import compile_launches

    with pytest.raises(RuntimeError, match="interpreter_only_kernel does not compile for sm_90.*Unsupported function"):
        compile_launches([_launch("interpreter_only_kernel")])


def test_every_launched_kernel_of_the_package_is_found():
    from tests.model.triton_aot import launched_kernels

    kernels = launched_kernels()
    assert "libra_megatron.model.attention_inputs._attention_inputs_fwd" in kernels
    assert not any(name.endswith(("_load_row", "_store_row", "_rope_t")) for name in kernels)  # helpers, not launched


def test_code_paths_keep_one_launch_per_boolean_combination_at_the_largest_size():
    from tests.model.triton_aot import code_paths

    def launch(d: int, backward: bool):
        return {"module": "m", "kernel": "k", "args": {"x": {"pointer": "fp32"}, "D": {"constexpr": d},
                                                       "BACKWARD": {"constexpr": backward}}}

    chosen = code_paths([launch(8, False), launch(128, False), launch(16, True), launch(12, True)])
    assert sorted((c["args"]["D"]["constexpr"], c["args"]["BACKWARD"]["constexpr"]) for c in chosen) == [
        (16, True), (128, False)]
