"""The block's linear layers, y = x·Wᵀ, as one autograd node instead of the five to eight that nn.Linear's
decomposition leaves on the tape.

  forward   y  = x₂·Wᵀ            x₂ = x viewed as [M, K] (M = the leading dimensions' product), W [N, K]
  backward  dx = dy₂·W            dy₂ = dy viewed as [M, N]
            dW = dy₂ᵀ·x₂          (only the gradients asked for)

Saved: x₂ and W, the tensors nn.Linear saves. The arithmetic is the same GEMM calls torch's own autograd
makes for `F.linear` (aten::linear → matmul → mm on the flattened input; mm's backward computes dW as
`(dy₂ᵀ·x₂)ᵀ` for the transposed operand Wᵀ and transposes it back, dx as `dy₂·W`), so outputs and both
gradients are bit for bit F.linear's, in every dtype and on every device (tests/test_kernels_linear.py).
One exception, which the model never meets: a frozen W with an input whose leading dimensions do not fold
into rows without a copy (a transposed view), where matmul runs a bmm instead and rounds differently. What it
cuts is host work: per linear, forward and backward, 3 of 14 aten ops (the transposes of W and of dW that
the generic mm backward makes, and a TBackward node), which on a GPU are host-side dispatches between
kernels and on the CPU are the step's op count (benchmarks/RESULTS.md, issue 24).

The reference is `F.linear` itself. There is no Triton kernel: the GEMMs are cuBLAS's (or the CPU BLAS's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


class LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        ctx.save_for_backward(x2, w)
        return x2.mm(w.t()).view(*x.shape[:-1], w.shape[0])  # [..., N]

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # [M, N]
        dx = dy2.mm(w).view(*dy.shape[:-1], w.shape[1]) if ctx.needs_input_grad[0] else None  # [..., K]
        dw = dy2.t().mm(x2) if ctx.needs_input_grad[1] else None  # [N, K]
        return dx, dw


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] · w [N, K]ᵀ -> [..., N], equal bit for bit to F.linear(x, w) with its gradients."""
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: x [..., K] and w [N, K] expected, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"linear: x and w must share a dtype, got {x.dtype} and {w.dtype}")
    return LinearFunction.apply(x, w)


class Linear(torch.nn.Linear):
    """nn.Linear without bias whose forward is `linear`: the same parameter, names and state dict."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kwargs) -> None:
        if bias:
            raise ValueError("c2a.kernels.linear.Linear has no bias (Llama's linears have none)")
        super().__init__(in_features, out_features, bias=False, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
