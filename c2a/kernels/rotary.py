"""Rotary position embedding (Su et al. 2021) in Meta's layout: interleaved pairs (x[2i], x[2i+1]).

Pair i of a head at position p is rotated by the angle p · θ^(-2i/Hd):
    (x0, x1) -> (x0·cos − x1·sin, x0·sin + x1·cos)
Positions come from `position_ids`, so packed documents restart at 0. HF checkpoints use the
rotate-half layout instead; c2a converts their q/k weights at the HF boundary (model/weights.py).

Torch reference first; the Triton kernels follow (kernels issue).
"""

from __future__ import annotations

import torch


def rotary_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, fp32, [B, T, Hd/2]; computed in fp32 as Meta and HF do."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq  # [B, T, Hd/2]
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, heads, Hd/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [B, T, heads, Hd/2, 2]
    return out.flatten(-2).to(x.dtype)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, H, Hd], k [B, T, K, Hd], position_ids [B, T] -> rotated (q, k) in their dtypes."""
    cos, sin = rotary_angles(position_ids, q.shape[-1], theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, Hd/2], broadcast over heads
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
