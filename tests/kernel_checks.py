"""Shared checks for the Triton kernel tests (tests/test_kernels_*.py).

The tolerance rule of the kernels issue: a kernel's error against the float64 reference may be at most
twice the error of the torch reference run in the kernel's own dtype. A floor of one unit in the last
place at the reference's largest magnitude covers outputs that torch happens to get exactly (an exact
zero gradient, a sum that rounds the same way) where "twice zero" would demand bit equality.
"""

from __future__ import annotations

import pytest
import torch

# CPU tensors through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 there); the compiled kernels
# where there is a GPU. The interpreter gets bf16 arithmetic wrong, so bf16 is tested on GPUs only.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def max_error(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.double() - ref64).abs().max().item() if x.numel() else 0.0


def assert_within_torch_error(name: str, out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor) -> None:
    """`out` (kernel) and `torch_out` (torch reference, same dtype) against `ref64` (float64 reference)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype}, expected {torch_out.dtype}"
    assert not out.isnan().any(), f"{name}: NaN in the kernel's output (an element left unwritten?)"
    kernel_err, torch_err = max_error(out, ref64), max_error(torch_out, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = torch.finfo(out.dtype).eps * scale
    assert kernel_err <= 2 * torch_err + floor, (
        f"{name}: kernel error {kernel_err:.3g} vs float64 exceeds twice torch's {torch_err:.3g} "
        f"(+ floor {floor:.3g}) in {out.dtype}"
    )


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled float tensors (int ones: a huge value), so an output
    element a kernel forgets to write shows up as NaN instead of as whatever memory held."""

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype in (torch.int32, torch.int64):
            return t.fill_(torch.iinfo(t.dtype).max)
        return t

    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


class CountingKernel:
    """Wraps a @triton.jit kernel so `kernel[grid](...)` launches are counted (with their keyword arguments,
    the constexprs among them); the launch itself is real."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.launches = 0
        self.kwargs: list[dict] = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.launches += 1
            self.kwargs.append(kwargs)
            return launch(*args, **kwargs)

        return counted


def count_launches(monkeypatch, module, name: str) -> CountingKernel:
    counter = CountingKernel(getattr(module, name))
    monkeypatch.setattr(module, name, counter)
    return counter
