"""c2a.kernels.linear: bit for bit F.linear (output and both gradients), close to float64, fewer aten ops."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from c2a.kernels.linear import Linear, linear, linear_reference
from c2a.model.llama import Llama, LlamaConfig

TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative to the output's scale


def run(fn, x, w, dy, x_grad=True, w_grad=True):
    x, w = x.detach().clone().requires_grad_(x_grad), w.detach().clone().requires_grad_(w_grad)
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def strided(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A [..., K] input whose last two dims are a transposed view (not contiguous)."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2]).to(dtype).transpose(-1, -2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "x_shape, n_out",
    [((13,), 11), ((7, 13), 11), ((2, 37, 64), 96), ((2, 3, 5, 17), 9), ((0, 8), 5), ((3, 1, 129), 1)],
    ids=str,
)
def test_linear_is_f_linear_bit_for_bit(x_shape, n_out, dtype):
    torch.manual_seed(0)
    x = torch.randn(x_shape).to(dtype)
    w = torch.randn(n_out, x_shape[-1]).to(dtype)
    dy = torch.randn(*x_shape[:-1], n_out).to(dtype)
    got, want = run(linear, x, w, dy), run(linear_reference, x, w, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs from F.linear's in {dtype}: max {(a - b).abs().max()}"
    ref64 = run(linear_reference, x.double(), w.double(), dy.double())
    for name, a, r in zip(("y", "dx", "dw"), got, ref64):
        scale = max(r.abs().max().item(), 1.0) if r.numel() else 1.0
        torch.testing.assert_close(a.double(), r, rtol=0, atol=TOLERANCES[dtype] * scale, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_linear_with_frozen_operands(dtype, contiguous):
    torch.manual_seed(1)
    x = torch.randn(2, 9, 24).to(dtype) if contiguous else strided((2, 9, 24), dtype)
    w, dy = torch.randn(10, 24).to(dtype), torch.randn(2, 9, 10).to(dtype)
    for x_grad, w_grad in ((True, True), (True, False), (False, True)):
        got = run(linear, x, w, dy, x_grad, w_grad)
        want = run(F.linear, x, w, dy, x_grad, w_grad)
        for name, a, b in zip(("y", "dx", "dw"), got, want):
            assert (a is None) == (b is None), f"{name}: computed although not asked for (or the reverse)"
            if a is None:
                continue
            if contiguous or w_grad:
                assert torch.equal(a, b), f"{name} differs ({x_grad=}, {w_grad=})"
            else:  # F.linear runs a bmm here (module docstring); ours the mm
                torch.testing.assert_close(a, b, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype] * 10, msg=name)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, x, w, dy, w_grad: bool = True) -> Counter:
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(w_grad)
    with _Ops() as mode:
        fn(x, w).backward(dy)
    return mode.ops


def test_linear_dispatches_fewer_ops_than_f_linear():
    """Why it exists: the transposes nn.Linear's decomposition adds (and its TBackward node) are host work
    on every GPU step; the GEMMs stay three."""
    x, w, dy = torch.randn(2, 7, 16), torch.randn(12, 16), torch.randn(2, 7, 12)
    ours, torchs = count_ops(linear, x, w, dy), count_ops(F.linear, x, w, dy)
    assert ours["aten.mm"] == torchs["aten.mm"] == 3
    assert sum(ours.values()) < sum(torchs.values()), (ours, torchs)
    assert ours["aten.t"] < torchs["aten.t"], (ours, torchs)
    # a frozen weight (LoRA's base): no dW GEMM
    assert count_ops(linear, x, w, dy, w_grad=False)["aten.mm"] == 2


def test_the_model_uses_it():
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=64)
    block = Llama(cfg).layers[0]
    linears = [block.attention.wq, block.attention.wk, block.attention.wv, block.attention.wo]
    linears += [block.feed_forward.w1, block.feed_forward.w2, block.feed_forward.w3]
    assert all(type(m) is Linear for m in linears)


@pytest.mark.parametrize(
    "x, w, error, message",
    [
        (torch.randn(3, 8), torch.randn(4, 9), ValueError, r"x \[..., K\] and w \[N, K\] expected, got \(3, 8\)"),
        (
            torch.randn(3, 8),
            torch.randn(8),
            ValueError,
            r"x \[..., K\] and w \[N, K\] expected, got \(3, 8\) and \(8,\)",
        ),
        (torch.randn(3, 8), torch.randn(4, 8).double(), TypeError, "x and w must share a dtype"),
    ],
    ids=["K", "w-dim", "dtype"],
)
def test_linear_rejects_bad_inputs(x, w, error, message):
    with pytest.raises(error, match=f"linear: {message}"):
        linear(x, w)


def test_linear_module_refuses_a_bias():
    with pytest.raises(ValueError, match="has no bias"):
        Linear(4, 3, bias=True)
