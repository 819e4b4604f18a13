"""Fused ops for the Llama block, each with its plain-torch reference beside it.

One switch picks the implementation for every op: the environment variable `C2A_KERNELS=torch|triton`.
Unset, Triton runs on CUDA tensors and the torch reference everywhere else; `C2A_KERNELS=triton
TRITON_INTERPRET=1` runs the Triton kernels on CPU tensors through Triton's interpreter. Asking for Triton
never silently falls back to torch. A second switch, read only on the Triton path, picks the attention
forward kernel: `C2A_ATTN_FWD=pointer|tma|tma_ws` (`attention_forward_variant`; unset: pointer).

Every Triton launch passes `enable_fp_fusion=True` (a launch option in Triton 3.4 through 3.9, the
CUDAOptions field the environment's TRITON_DEFAULT_FP_FUSION only defaults): the kernels were written and
measured with mul + add contracted to FMAs (`x·rstd·w`, the online softmax's `exp(x − m)` rescaling, the
attention's `exp2(s·scale − m)`), and Triton 3.9 warns that 3.10 turns that default off, which would add an
instruction and a rounding to each. The interpreter ignores the option (it runs numpy, unfused).

This package imports nothing from the rest of c2a.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ._triton import HAS_TRITON
from .rotary import RopeScaling, Rotation

if TYPE_CHECKING:
    from . import attention

BACKENDS = ("torch", "triton")
# The attention forward kernels: attention.py's pointer forward (any GPU), or attention_tma.py's through
# tensor descriptors (compute capability 9.0+), its bulk loop warp-specialised for "tma_ws"
ATTENTION_FORWARDS = ("pointer", "tma", "tma_ws")


def backend(device: torch.device) -> str:
    """The implementation the ops use for tensors on `device`: "torch" or "triton"."""
    choice = os.environ.get("C2A_KERNELS", "").strip().lower()
    if not choice:
        return "triton" if device.type == "cuda" else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"C2A_KERNELS must be one of {', '.join(BACKENDS)} (or unset), got {choice!r}")
    if choice == "triton" and not HAS_TRITON:
        raise RuntimeError("C2A_KERNELS=triton, but Triton is not installed (it ships for Linux); unset C2A_KERNELS")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"C2A_KERNELS=triton on a {device.type} tensor needs TRITON_INTERPRET=1 (Triton's CPU interpreter); "
            "unset C2A_KERNELS to use the torch path"
        )
    return choice


def attention_forward_variant() -> str:
    """The forward kernel of the Triton attention, from C2A_ATTN_FWD: "pointer" where it is unset (the
    default, decided here: the TMA forward ran at 0.75-0.96x its speed on an H200, attention_tma.py), "tma"
    or "tma_ws" where it asks for attention_tma.py's. The torch path ignores it."""
    choice = os.environ.get("C2A_ATTN_FWD") or "pointer"
    if choice not in ATTENTION_FORWARDS:
        raise ValueError(f"C2A_ATTN_FWD must be one of {', '.join(ATTENTION_FORWARDS)} (or unset), got {choice!r}")
    return choice


# The ops the model calls. Each picks its implementation from the switch above; the Triton modules are
# imported only when chosen, so the torch path never needs a working Triton.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]."""
    if backend(x.device) == "triton":
        from .rmsnorm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    from .rmsnorm import rms_norm_reference

    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual, y = RMSNorm(h) -> (h, y); the Triton path does both in one pass over the rows."""
    if backend(x.device) == "triton":
        from .rmsnorm import add_rms_norm as triton_add_rms_norm

        return triton_add_rms_norm(x, residual, weight, eps)
    from .rmsnorm import add_rms_norm_reference

    return add_rms_norm_reference(x, residual, weight, eps)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | Rotation,
    theta: float,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, H, Hd], k [B, T, K, Hd], position_ids [B, T] -> rotated (q, k); `scaling`: Llama-3.1's. The
    model passes a `rotary.Rotation` built once per forward, so layers share the torch path's cos/sin."""
    if backend(q.device) == "triton":
        from .rotary import apply_rotary as triton_apply_rotary

        ids = position_ids.position_ids if isinstance(position_ids, Rotation) else position_ids
        return triton_apply_rotary(q, k, ids, theta, scaling)  # the kernel computes the angles per token
    from .rotary import rotary_reference

    return rotary_reference(q, k, position_ids, theta, scaling)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate silu(a) · b, elementwise."""
    if backend(a.device) == "triton":
        from .swiglu import swiglu as triton_swiglu

        return triton_swiglu(a, b)
    from .swiglu import swiglu_reference

    return swiglu_reference(a, b)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | attention.Documents | None
) -> torch.Tensor:
    """q [B, T, H, Hd], k and v [B, T, K, Hd] -> [B, T, H, Hd]; documents restart where position_ids is 0.
    The model passes an `attention.Documents` built once per forward, so layers share its document index.
    On the Triton path `attention_forward_variant()` picks the forward kernel; the backward is attention.py's."""
    if backend(q.device) == "triton":
        variant = attention_forward_variant()
        if variant == "pointer":
            from .attention import flash_attention

            return flash_attention(q, k, v, position_ids)
        from .attention_tma import flash_attention_tma

        return flash_attention_tma(q, k, v, position_ids, warp_specialize=variant == "tma_ws")
    from .attention import attention_reference

    return attention_reference(q, k, v, position_ids)


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ w·CE(h·Wᵀ, labels) over labels ≠ -100 (w: per-row `weights`, default 1), divided by `normalizer`
    (default: their count)."""
    if backend(h.device) == "triton":
        from .cross_entropy import linear_cross_entropy as triton_linear_cross_entropy

        return triton_linear_cross_entropy(h, weight, labels, normalizer, weights=weights)
    from .cross_entropy import linear_cross_entropy_chunked

    return linear_cross_entropy_chunked(h, weight, labels, normalizer, weights)


def dequantize_nf4(
    codes: torch.Tensor,
    qabsmax: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """NF4 codes uint8 [blocks, 32] with their double-quantized scales -> the weight [shape] in `dtype` (nf4.py)."""
    if backend(codes.device) == "triton":
        from .nf4 import dequantize_nf4 as triton_dequantize_nf4

        return triton_dequantize_nf4(codes, qabsmax, absmax2, offset, shape, dtype)
    from .nf4 import dequantize_nf4_reference

    return dequantize_nf4_reference(codes, qabsmax, absmax2, offset, shape, dtype)
