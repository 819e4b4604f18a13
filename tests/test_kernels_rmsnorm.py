"""Triton RMSNorm and fused residual-add RMSNorm against float64 references: outputs, dx, dw."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_within_torch_error, count_launches, poisoned_empty  # noqa: F401

from c2a.kernels import rmsnorm
from c2a.kernels.rmsnorm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference

EPS = 1e-5


def rms_norm_float64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The formula in float64 throughout (rms_norm_reference itself normalises in fp32, by design)."""
    x, w = x.double(), w.double()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPS) * w


def add_rms_norm_float64(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.double() + r.double()
    return h, rms_norm_float64(h, w)


def inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, a weight away from 1 (so a missing or transposed weight shows), and an upstream gradient."""
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    return x, w, dy


def grads(fn, tensors: list[torch.Tensor], outputs_grads: list[torch.Tensor]):
    """Run fn on fresh leaf copies of tensors -> (outputs, grads of the leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, outputs_grads)
    return outs, [leaf.grad for leaf in leaves]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 80), (7, 80), (129, 80), (7, 4097), (3, 5, 80)], ids=str)
def test_rms_norm_matches_float64(shape, dtype, monkeypatch):
    fwd = count_launches(monkeypatch, rmsnorm, "_rms_norm_fwd_kernel")
    bwd = count_launches(monkeypatch, rmsnorm, "_rms_norm_bwd_kernel")
    x, w, dy = inputs(shape, dtype)
    (y,), (dx, dw) = grads(lambda x, w: rms_norm(x, w, EPS), [x, w], [dy])
    (y_t,), (dx_t, dw_t) = grads(lambda x, w: rms_norm_reference(x, w, EPS), [x, w], [dy])
    (y64,), (dx64, dw64) = grads(rms_norm_float64, [x.double(), w.double()], [dy.double()])
    assert (fwd.launches, bwd.launches) == (1, 1)
    assert_within_torch_error("y", y, y_t, y64)
    assert_within_torch_error("dx", dx, dx_t, dx64)
    assert_within_torch_error("dw", dw, dw_t, dw64)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 80), (129, 80), (7, 4097)], ids=str)
def test_add_rms_norm_matches_float64(shape, dtype):
    x, w, dy = inputs(shape, dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype)
    dh = torch.randn(shape, device=DEVICE).to(dtype)
    (h, y), (dx, dr, dw) = grads(lambda x, r, w: add_rms_norm(x, r, w, EPS), [x, r, w], [dh, dy])
    (h_t, y_t), (dx_t, dr_t, dw_t) = grads(lambda x, r, w: add_rms_norm_reference(x, r, w, EPS), [x, r, w], [dh, dy])
    (_h64, y64), (dx64, dr64, dw64) = grads(
        add_rms_norm_float64, [x.double(), r.double(), w.double()], [dh.double(), dy.double()]
    )
    torch.testing.assert_close(h, h_t, rtol=0, atol=0)  # the same single rounding of x + r
    assert_within_torch_error("y", y, y_t, y64)
    assert_within_torch_error("dx", dx, dx_t, dx64)
    assert_within_torch_error("dresidual", dr, dr_t, dr64)
    assert_within_torch_error("dw", dw, dw_t, dw64)


def test_weight_without_grad_skips_dw(monkeypatch):
    x, w, dy = inputs((7, 80), torch.float32)
    x.requires_grad_()
    bwd = count_launches(monkeypatch, rmsnorm, "_rms_norm_bwd_kernel")
    rms_norm(x, w, EPS).backward(dy)
    x64 = x.detach().double().requires_grad_()
    rms_norm_float64(x64, w).backward(dy.double())
    assert w.grad is None and bwd.launches == 1 and bwd.kwargs[0]["COMPUTE_DW"] is False  # no dw work at all
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_dw_partial_sums_are_fp32():
    """dw of fp16 rows whose sum needs more than fp16's precision: only an fp32 reduction keeps it. 16 rows
    per backward program and the most programs the launcher uses on this device (4 on CPU, 4 per SM on a
    GPU), so each program really sums 16 rows into its partial: with fewer rows than programs a GPU gives
    each program one row and an fp16 accumulator would pass unseen."""
    programs = rmsnorm._bwd_programs(1 << 30, DEVICE)
    rows, D = 16 * programs, 80
    x = torch.ones(rows, D, device=DEVICE, dtype=torch.float16, requires_grad=True)
    w = torch.ones(D, device=DEVICE, dtype=torch.float16, requires_grad=True)
    # each program's rows: one 1.0, then fifteen 2^-12 (a quarter of fp16's ulp at 1): an fp16 running sum
    # stays at 1.0, an fp32 one reaches 1 + 15·2^-12
    dy = torch.full((rows, D), 2**-12, device=DEVICE, dtype=torch.float16)
    dy[::16] = 1.0
    rms_norm(x, w, 0.0).backward(dy)
    exact = torch.tensor(programs * (1 + 15 * 2**-12), dtype=torch.float64).to(torch.float16)
    assert exact != float(programs)  # the fp16-accumulated answer would differ at this row count
    assert torch.all(w.grad == exact), (w.grad[:4], exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("layout", ["last-position", "features-strided"])
def test_row_strided_input(layout, fused, dtype, monkeypatch):
    """Generation's last position of a batch, h[:, -1:] ([B, 1, D], row stride T·D), goes through as the
    view it is (no copy); a tensor whose features are not unit-stride is copied first. Values and every
    gradient against float64, through the views back into the full tensors."""
    fwd = count_launches(monkeypatch, rmsnorm, "_rms_norm_fwd_kernel")
    B, T, D = 3, 5, 80
    full = (
        torch.randn(B, T, D, device=DEVICE).to(dtype)
        if layout == "last-position"
        else torch.randn(D, B, device=DEVICE).to(dtype)
    )
    res_full = torch.randn_like(full)
    w = (1 + 0.5 * torch.randn(D, device=DEVICE)).to(dtype)
    view = (lambda t: t[:, -1:]) if layout == "last-position" else (lambda t: t.T)
    dy = torch.randn(view(full).shape, device=DEVICE).to(dtype)
    dh = torch.randn(view(full).shape, device=DEVICE).to(dtype)
    assert not view(full).is_contiguous()

    def run(op, full, res_full, w):
        leaves = [t.detach().clone().requires_grad_() for t in (full, res_full, w)]
        x, r = view(leaves[0]), view(leaves[1])
        if fused:
            h, y = op(x, r, leaves[2])
            torch.autograd.backward((h, y), (dh.to(h.dtype), dy.to(y.dtype)))
            return (h, y), [leaf.grad for leaf in leaves]
        y = op(x, leaves[2])
        y.backward(dy.to(y.dtype))
        return (y,), [leaves[0].grad, leaves[2].grad]

    if fused:
        kernel_op, torch_op = (
            (lambda x, r, w: add_rms_norm(x, r, w, EPS)),
            (lambda x, r, w: add_rms_norm_reference(x, r, w, EPS)),
        )
        float64_op = add_rms_norm_float64
    else:
        kernel_op, torch_op = (lambda x, w: rms_norm(x, w, EPS)), (lambda x, w: rms_norm_reference(x, w, EPS))
        float64_op = rms_norm_float64
    outs, grads_k = run(kernel_op, full, res_full, w)
    outs_t, grads_t = run(torch_op, full, res_full, w)
    outs64, grads64 = run(float64_op, full.double(), res_full.double(), w.double())
    assert fwd.launches == 1
    for name, out, out_t, out64 in zip(("h", "y") if fused else ("y",), outs, outs_t, outs64):
        assert_within_torch_error(name, out, out_t, out64)
    for name, g, g_t, g64 in zip(("dx", "dresidual", "dw") if fused else ("dx", "dw"), grads_k, grads_t, grads64):
        assert_within_torch_error(name, g, g_t, g64)


def test_last_position_is_not_copied(monkeypatch):
    """The row-strided view reaches the kernel as it is: x's pointer and row stride, not a copy's."""
    launched = []
    kernel = rmsnorm._rms_norm_fwd_kernel

    class Capture:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: (launched.append(args), kernel[grid](*args, **kwargs))

    monkeypatch.setattr(rmsnorm, "_rms_norm_fwd_kernel", Capture())
    full = torch.randn(3, 5, 80, device=DEVICE)
    x = full[:, -1:]
    rms_norm(x, torch.ones(80, device=DEVICE), EPS)
    (args,) = launched
    assert args[0].data_ptr() == x.data_ptr() and args[6] == 5 * 80  # x_ptr, stride_x_row: the view itself


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: (torch.randn(4, 8).double(), torch.ones(8).double()),
            "x must be float32, bfloat16 or float16, got torch.float64",
        ),
        (lambda: (torch.randn(4, 8), torch.ones(7)), r"weight must be \[D\] = \[8\]"),
        (
            lambda: (torch.randn(4, 8), torch.ones(8).half()),
            "weight must have x's dtype torch.float32, got torch.float16",
        ),
        (lambda: (torch.randn(4, 8), torch.ones(8, device="meta")), "weight must be on x's device"),
        (lambda: (torch.randn(1, 40000), torch.ones(40000)), "D must be at most 32768"),
    ],
)
def test_rms_norm_rejects_bad_inputs(make, message):
    x, w = make()
    with pytest.raises((ValueError, TypeError), match=f"rms_norm: {message}"):
        rms_norm(x.to(DEVICE), w if w.device.type == "meta" else w.to(DEVICE), EPS)


def test_add_rms_norm_rejects_mismatched_residual():
    x, _w, _ = inputs((4, 8), torch.float32)
    with pytest.raises(
        ValueError, match=r"add_rms_norm: residual must match x \(\(4, 8\), torch.float32\), got \(\(4, 7\)"
    ):
        add_rms_norm(x, torch.randn(4, 7, device=DEVICE), torch.ones(8, device=DEVICE), EPS)
