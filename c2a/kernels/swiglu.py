"""SwiGLU gate (Shazeer 2020): y = silu(a) · b, with silu(a) = a · sigmoid(a).

Torch reference first; the Triton kernels follow (kernels issue).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b
