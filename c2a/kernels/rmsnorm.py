"""RMSNorm: y = x · rsqrt(mean(x²) + eps) · w  (Zhang & Sennrich 2019; Llama-2's pre-norm).

Torch reference first; the Triton kernels follow (kernels issue).
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Meta's RMSNorm: normalise in fp32, cast back to x's dtype, then scale by the weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight
