"""A linear layer whose three matmuls run in float8: y = x·Wᵀ, dx = dy·W, dW = dyᵀ·x.

Scaling is dynamic and tensorwise: each operand gets one fp32 scale s = FP8_MAX / amax(|t|) (amax clamped
away from 0), is multiplied by it and cast (saturating) to float8, and the matmul of two such operands
multiplies its fp32 accumulator by both inverse scales (torch._scaled_mm's scale_a, scale_b):

  forward   x, W  → e4m3 (3 mantissa bits, max 448)       y  = (x₈·W₈ᵀ) / (s_x·s_W), in x's dtype
  backward  dy    → e5m2 (2 mantissa bits, max 57344)     dx = (dy₈·W₈) / (s_dy·s_W)
                                                          dW = (dy₈ᵀ·x₈) / (s_dy·s_x), in W's dtype

e4m3 for what the forward reads, e5m2 for gradients, whose range is wider (as torchao's Float8Linear and
Transformer Engine's "hybrid" recipe do). Saved for the backward: x₈ (one byte an element) and its scale,
instead of x (two bytes in bf16), and W as nn.Linear saves it, quantized again in the backward (the same W₈). Operand layouts follow cuBLASLt's FP8 rule (the first operand
row-major, the second column-major). Off CUDA the matmuls run `scaled_mm_reference`, _scaled_mm's arithmetic
in fp32 (torch 2.13's CPU _scaled_mm computes the same, but too slowly to train with).

`fp8_linear_reference` is the same arithmetic in float64 on the dequantized operands: what the fp8 matmuls
compute up to their accumulation order and output rounding.
"""

from __future__ import annotations

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t·s cast to `dtype`, 1/s) with s = max(dtype) / amax(|t|): the tensor's largest element lands on the
    format's largest finite value; fp32 arithmetic, saturating."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=_EPS)
    scale = fmax / amax
    q = (t.detach().float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.reciprocal()


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor | None = None) -> tuple:
    """float64 on the dequantized operands: y, and with `dy` also (dx, dW)."""
    x2 = x.reshape(-1, x.shape[-1])
    (xq, sx), (wq, sw) = quantize(x2, E4M3), quantize(w, E4M3)
    xd, wd = xq.double() * sx.double(), wq.double() * sw.double()
    y = (xd @ wd.t()).reshape(*x.shape[:-1], w.shape[0])
    if dy is None:
        return (y,)
    gq, sg = quantize(dy.reshape(-1, dy.shape[-1]), E5M2)
    gd = gq.double() * sg.double()
    return y, (gd @ wd).reshape(x.shape), gd.t() @ xd


def scaled_mm_reference(
    a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """torch._scaled_mm's arithmetic in plain torch: the float8 operands widened to fp32 (exactly: every
    float8 value is an fp32 value, and so is every product of two), an fp32 matmul, times both inverse
    scales, rounded once to `dtype`. Differs from _scaled_mm only in the accumulation order."""
    return ((a.float() @ b.float()) * (sa * sb)).to(dtype)


def _mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] row-major · b [K, N] column-major, each with its inverse scale, out in `dtype`. On CUDA
    torch._scaled_mm (cuBLASLt's FP8 GEMM); elsewhere `scaled_mm_reference`: torch 2.13's CPU _scaled_mm
    computes the same but takes 3.6 s for a 128 x 192 x 512 product (measured on a 2-core CPU, against 0.03 s
    for the fp32 matmul), too slow to train even a test model (tests/test_fp8.py checks the two agree)."""
    if a.is_cuda:
        return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=dtype)
    return scaled_mm_reference(a, b, sa, sb, dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        (xq, sx), (wq, sw) = quantize(x2, E4M3), quantize(w, E4M3)
        y = _mm(xq, wq.t(), sx, sw, x.dtype)  # [M, N]
        # the weight itself, as nn.Linear saves it (under FSDP2 the unsharded parameter, gathered again for
        # the backward), quantized again there: a float8 copy kept from forward to backward would add a
        # byte per parameter of every block at once
        ctx.save_for_backward(xq, sx, w)
        ctx.shape = x.shape
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xq, sx, w = ctx.saved_tensors
        wq, sw = quantize(w, E4M3)  # the forward's, bit for bit
        gq, sg = quantize(dy.reshape(-1, dy.shape[-1]), E5M2)  # [M, N]
        dx = _mm(gq, wq, sg, sw, dy.dtype)  # [M, N]·[N, K]
        dw = _mm(gq.t(), xq, sg, sx, w.dtype)  # [N, M]·[M, K]
        return dx.reshape(ctx.shape), dw


def fp8_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] · w [N, K]ᵀ with all three matmuls in float8 (see the module docstring)."""
    if x.shape[-1] != w.shape[1] or w.dim() != 2:
        raise ValueError(
            f"fp8_linear: x [..., {w.shape[-1]}] and w [N, K] expected, got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    return _FP8Linear.apply(x, w)


class Float8Linear(torch.nn.Linear):
    """nn.Linear (no bias) whose forward is `fp8_linear`: the same parameter, names and state dict, so
    checkpoints and exports do not change. Made by changing a Linear's class in place (`to_float8`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight)


def to_float8(linear: torch.nn.Linear) -> None:
    if linear.bias is not None:
        raise ValueError("Float8Linear has no bias")
    linear.__class__ = Float8Linear
