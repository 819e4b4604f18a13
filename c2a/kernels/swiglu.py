"""SwiGLU gate (Shazeer 2020): y = silu(a) · b, with silu(a) = a · sigmoid(a).

Backward, with s = sigmoid(a):
    dsilu/da = s + a·s·(1 − s) = s · (1 + a·(1 − s))
    da = dy · b · s · (1 + a·(1 − s))        db = dy · silu(a)
Saved for the backward: a and b (the inputs); sigmoid and silu are recomputed rather than stored, which
costs a few FLOPs per element and saves a [tokens, F] tensor. dtype policy: a and b in fp32, bf16 or fp16
(the same dtype); every product in fp32; y, da and db in the input dtype.

Torch reference first (the spec), then the Triton kernels, the launchers, the autograd.Function and the
public function `swiglu`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


# ---------------------------------------------------------------------------------------------------------
# Triton kernels: elementwise over the flattened (contiguous) tensors, BLOCK elements a program.


# fmt: off
@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, y_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = a * tl.sigmoid(a)
    tl.store(y_ptr + offs, (silu * b).to(y_ptr.dtype.element_ty), mask=mask)
# fmt: on


# fmt: off
@triton.jit
def _swiglu_bwd_kernel(dy_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    tl.store(da_ptr + offs, (dy * b * s * (1.0 + a * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offs, (dy * silu).to(db_ptr.dtype.element_ty), mask=mask)
# fmt: on


# ---------------------------------------------------------------------------------------------------------
# Launchers

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _settings() -> tuple[int, int]:
    """BLOCK and num_warps of both kernels.

    4096 elements over 8 warps is 16 a thread: two 16-byte vectors of bf16 per operand, enough bytes in
    flight per SM to stream at near copy bandwidth, and 16k tokens x 11008 gives ~44k programs, far more
    than 132 SMs need. Chosen by reasoning, not swept. On an H200 (bf16, 16384 tokens × 11008) forward and
    forward + backward both stream at a device-to-device copy's bandwidth (103%; benchmarks/kernels.py,
    benchmarks/RESULTS.md).
    """
    return 4096, 8


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    op = "swiglu"
    if a.dtype not in _DTYPES or b.dtype != a.dtype:
        raise TypeError(
            f"{op}: a and b must share a dtype among float32, bfloat16, float16, got {a.dtype} and {b.dtype}"
        )
    if a.shape != b.shape:
        raise ValueError(f"{op}: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{op}: a and b must be on the same device, got {a.device} and {b.device}")
    for name, t in (("a", a), ("b", b)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(a, memory_format=torch.contiguous_format)
    n = a.numel()
    block, num_warps = _settings()
    if n > 0:
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](
            a, b, y, n, BLOCK=block, num_warps=num_warps, enable_fp_fusion=True
        )
    return y


def swiglu_backward(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy = dy.contiguous()
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    db = torch.empty_like(b, memory_format=torch.contiguous_format)
    n = a.numel()
    block, num_warps = _settings()
    if n > 0:
        # fmt: off
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](
            dy, a, b, da, db, n, BLOCK=block, num_warps=num_warps, enable_fp_fusion=True
        )
        # fmt: on
    return da, db


# ---------------------------------------------------------------------------------------------------------
# autograd


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        a, b = ctx.saved_tensors
        return swiglu_backward(dy, a, b)


# ---------------------------------------------------------------------------------------------------------
# public function


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) · b elementwise, a and b of the same shape and dtype, through the Triton kernels."""
    _check(a, b)
    return SwiGLUFunction.apply(a, b)
