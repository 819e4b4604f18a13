"""Triton SwiGLU gate silu(a) · b against float64: output, da, db."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_within_torch_error, count_launches, poisoned_empty  # noqa: F401

from c2a.kernels import swiglu as swiglu_module
from c2a.kernels.swiglu import swiglu, swiglu_reference


def run(fn, a, b, dy):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y = fn(a, b)
    y.backward(dy)
    return y, a.grad, b.grad


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 80), (7, 80), (129, 80), (7, 4097), (2, 3, 11008)], ids=str)
def test_swiglu_matches_float64(shape, dtype, monkeypatch):
    fwd = count_launches(monkeypatch, swiglu_module, "_swiglu_fwd_kernel")
    bwd = count_launches(monkeypatch, swiglu_module, "_swiglu_bwd_kernel")
    a = (4 * torch.randn(shape, device=DEVICE)).to(dtype)  # wide enough to reach sigmoid's flat tails
    b = torch.randn(shape, device=DEVICE).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y, da, db = run(swiglu, a, b, dy)
    assert (fwd.launches, bwd.launches) == (1, 1)
    y_t, da_t, db_t = run(swiglu_reference, a, b, dy)
    y64, da64, db64 = run(swiglu_reference, a.double(), b.double(), dy.double())
    assert_within_torch_error("y", y, y_t, y64)
    assert_within_torch_error("da", da, da_t, da64)
    assert_within_torch_error("db", db, db_t, db64)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(4, 8), torch.randn(4, 8).half()), "a and b must share a dtype"),
        (lambda: (torch.randn(4, 8).double(), torch.randn(4, 8).double()), "a and b must share a dtype among float32"),
        (
            lambda: (torch.randn(4, 8), torch.randn(4, 9)),
            r"a and b must have the same shape, got \(4, 8\) and \(4, 9\)",
        ),
        (lambda: (torch.randn(8, 4).T, torch.randn(4, 8)), "a must be contiguous"),
    ],
    ids=["mixed-dtype", "float64", "shape", "strides"],
)
def test_swiglu_rejects_bad_inputs(make, message):
    a, b = (t.to(DEVICE) for t in make())
    with pytest.raises((ValueError, TypeError), match=f"swiglu: {message}"):
        swiglu(a, b)
