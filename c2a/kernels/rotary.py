"""Rotary position embedding (Su et al. 2021) in Meta's layout: interleaved pairs (x[2i], x[2i+1]).

Pair i of a head at position p is rotated by the angle p · f_i, with the inverse frequency f_i = θ^(-2i/Hd):
    (x0, x1) -> (x0·cos − x1·sin, x0·sin + x1·cos)
Llama-3.1's rope scaling (`RopeScaling`, HF's rope_type "llama3") changes only the frequencies: with the
wavelength λ_i = 2π / f_i and the original context L (8192), s the factor, lo/hi the low/high frequency factors,
    λ_i < L / hi          (high frequency): f_i unchanged
    λ_i > L / lo          (low frequency):  f_i / s
    otherwise (between):  (1 − a)·f_i / s + a·f_i,  a = (L / λ_i − lo) / (hi − lo)
(Meta's llama-models apply_scaling; HF's _compute_llama3_parameters). The kernel takes the Hd/2 frequencies
as an fp32 tensor, so scaled and plain rope are one kernel.
Positions come from `position_ids`, so packed documents restart at 0. HF checkpoints use the
rotate-half layout instead; c2a converts their q/k weights at the HF boundary (model/weights.py).

Triton kernel: one program per token (b, t) rotates that token's H query heads and K key heads in one
launch (GQA: K may be smaller than H), with the angles computed once per token from position_ids[b, t]
and the fp32 inverse frequencies the reference uses. The backward is the same kernel rotating by −θ
(a rotation's inverse is its transpose): dx0 = g0·cos + g1·sin, dx1 = −g0·sin + g1·cos. Nothing is
saved but position_ids; cos and sin are recomputed. dtype policy: q and k in fp32, bf16 or fp16; the
rotation in fp32; outputs in the input dtype.

Torch reference first (the spec), then the Triton kernel, the launcher, the autograd.Function and the
public function `apply_rotary`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ._triton import tl, triton


class RopeScaling(NamedTuple):
    """Llama-3.1 rope scaling (a tuple, so it can key a cache): the factor s, the low and high frequency
    factors and the original context length L in tokens. Llama-3.1: (8, 1, 4, 8192); Llama-3.2 1B/3B: s = 32."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int


def rotary_inv_freq(
    head_dim: int, theta: float, device: torch.device, scaling: RopeScaling | None = None
) -> torch.Tensor:
    """The Hd/2 inverse frequencies θ^(-2i/Hd), llama3-scaled when `scaling` is given (module docstring),
    fp32 [Hd/2], computed as Meta and HF do (fp32 powers; the scaling's blend in fp32 too)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    s, lo, hi, L = scaling
    wavelen = 2 * math.pi / inv_freq  # tokens per full turn of pair i
    smooth = (L / wavelen - lo) / (hi - lo)  # 0 at the low-frequency edge, 1 at the high one
    blended = (1 - smooth) * inv_freq / s + smooth * inv_freq
    scaled = torch.where(wavelen > L / lo, inv_freq / s, inv_freq)
    middle = (wavelen >= L / hi) & (wavelen <= L / lo)
    return torch.where(middle, blended, scaled)


def rotary_angles(
    position_ids: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, fp32, [B, T, Hd/2]; computed in fp32 as Meta and HF do."""
    inv_freq = rotary_inv_freq(head_dim, theta, position_ids.device, scaling)
    angles = position_ids.float()[..., None] * inv_freq  # [B, T, Hd/2]
    return angles.cos(), angles.sin()


class Rotation:
    """The position_ids [B, T] of one model forward, shared by its layers (as attention's Documents is): the
    torch path's cos/sin tables are computed by the first layer that asks and reused by the others and by
    activation-checkpoint recompute, instead of once per layer and again per recompute. The Triton path
    reads only `position_ids` (its kernel computes the angles per token)."""

    def __init__(self, position_ids: torch.Tensor) -> None:
        self.position_ids = position_ids
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def of(position_ids: torch.Tensor | Rotation) -> Rotation:
        return position_ids if isinstance(position_ids, Rotation) else Rotation(position_ids)

    def tables(
        self, head_dim: int, theta: float, scaling: RopeScaling | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([cos, cos], [−sin, sin]) per pair, fp32 [B, T, 1, Hd/2, 2] (broadcast over heads), for `_rotate`."""
        key = (head_dim, float(theta), scaling)
        if key not in self._tables:
            cos, sin = rotary_angles(self.position_ids, head_dim, theta, scaling)  # [B, T, Hd/2]
            self._tables[key] = (
                torch.stack((cos, cos), dim=-1)[:, :, None],
                torch.stack((-sin, sin), dim=-1)[:, :, None],
            )
        return self._tables[key]


def _rotate(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """(x0, x1) -> (x0·cos + x1·(−sin), x1·cos + x0·sin): the module docstring's rotation to the bit (a
    negated product and a commuted sum round alike), as two products and one sum over the pairs instead of
    selecting x0 and x1 and stacking, which autograd would undo with zero-filled gradient buffers."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, heads, Hd/2, 2]
    out = pairs * cos2 + pairs.flip(-1) * sin2  # pairs.flip(-1) = (x1, x0)
    return out.flatten(-2).to(x.dtype)  # [B, T, heads, Hd]


def rotary_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | Rotation,
    theta: float,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, H, Hd], k [B, T, K, Hd], position_ids [B, T] (or their Rotation) -> rotated (q, k) in their
    dtypes."""
    cos2, sin2 = Rotation.of(position_ids).tables(q.shape[-1], theta, scaling)
    return _rotate(q, cos2, sin2), _rotate(k, cos2, sin2)


# ---------------------------------------------------------------------------------------------------------
# Triton kernel


# fmt: off
@triton.jit
def _rotate_heads(
    in_ptr, out_ptr, in_offset, out_offset, n_heads, head_dim, cos, sin, BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr
):
    # One token's [n_heads, head_dim] tile (head stride head_dim, unit feature stride), loaded whole so the
    # load is contiguous, then split into its interleaved pairs (x0, x1) = (x[2i], x[2i+1]).
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HD)
    offs = heads[:, None] * head_dim + dims[None, :]
    mask = (heads[:, None] < n_heads) & (dims[None, :] < head_dim)  # head_dim is even: pairs mask together
    x = tl.load(in_ptr + in_offset + offs, mask=mask, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HD // 2, 2)))  # [BLOCK_H, BLOCK_HD/2] each
    out = tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos)  # [BLOCK_H, BLOCK_HD/2, 2]
    out = tl.reshape(out, (BLOCK_H, BLOCK_HD))
    tl.store(out_ptr + out_offset + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
# fmt: on


# fmt: off
@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    inv_freq_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_q_b,
    stride_q_t,
    stride_k_b,
    stride_k_t,
    stride_qo_b,
    stride_qo_t,
    stride_ko_b,
    stride_ko_t,
    stride_pos_b,
    stride_pos_t,
    seq_len,
    n_q_heads,
    n_k_heads,
    head_dim,
    SIGN: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    # q [B, T, H, Hd] and k [B, T, K, Hd] with packed (heads, Hd) per token and any token strides; one
    # program per token. SIGN = +1 rotates by +θ (forward), −1 by −θ (backward).
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    pos = tl.load(pos_ptr + b * stride_pos_b + t * stride_pos_t).to(tl.float32)
    pairs = tl.arange(0, BLOCK_HD // 2)
    inv_freq = tl.load(inv_freq_ptr + pairs, mask=pairs < head_dim // 2, other=0.0)
    angle = pos * inv_freq  # fp32 product, as the reference's position_ids.float() * inv_freq
    cos = tl.cos(angle)[None, :]
    sin = (SIGN * tl.sin(angle))[None, :]
    _rotate_heads(
        q_ptr, q_out_ptr, b * stride_q_b + t * stride_q_t, b * stride_qo_b + t * stride_qo_t,
        n_q_heads, head_dim, cos, sin, BLOCK_HQ, BLOCK_HD,
    )
    _rotate_heads(
        k_ptr, k_out_ptr, b * stride_k_b + t * stride_k_t, b * stride_ko_b + t * stride_ko_t,
        n_k_heads, head_dim, cos, sin, BLOCK_HK, BLOCK_HD,
    )
# fmt: on


# ---------------------------------------------------------------------------------------------------------
# Launcher

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _settings(n_q_heads: int, n_k_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """BLOCK_HQ, BLOCK_HK, BLOCK_HD and num_warps for one token's tiles.

    Blocks are the sizes rounded up to powers of two (masked). Warps: the q tile over 512 elements a warp
    (16 fp32 values a thread, two 16-byte bf16 vectors), 1..8: Llama-2 7B's 32 x 128 tile gets 8 warps.
    Chosen by reasoning, not swept. On an H200 (bf16, 16384 tokens, 32 heads of 128) the forward streams at
    92% of a device-to-device copy's bandwidth, forward + backward at 60% (benchmarks/kernels.py;
    benchmarks/RESULTS.md).
    """
    block_hq, block_hk = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
    block_hd = max(triton.next_power_of_2(head_dim), 2)
    return block_hq, block_hk, block_hd, min(max(block_hq * block_hd // 512, 1), 8)


@functools.lru_cache(maxsize=64)
def _cached_inv_freq(head_dim: int, theta: float, device: torch.device, scaling: RopeScaling | None) -> torch.Tensor:
    return rotary_inv_freq(head_dim, theta, device, scaling)


def _packed_heads(t: torch.Tensor) -> bool:
    """True when each token's [heads, Hd] block is contiguous (what the kernel indexes)."""
    return t.stride(-1) == 1 and (t.shape[-2] == 1 or t.stride(-2) == t.shape[-1])


def _check(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float, scaling: RopeScaling | None
) -> None:
    op = "apply_rotary"
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be [B, T, heads, Hd], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, _, Hd = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != Hd:
        raise ValueError(f"{op}: k must be [B, T, K, Hd] = [{B}, {T}, K, {Hd}] to match q, got {tuple(k.shape)}")
    if Hd % 2:
        raise ValueError(f"{op}: head dim must be even (rotary pairs), got {Hd}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise TypeError(
            f"{op}: q and k must share a dtype among float32, bfloat16, float16, got {q.dtype} and {k.dtype}"
        )
    if position_ids.shape != (B, T):
        raise ValueError(f"{op}: position_ids must be [B, T] = [{B}, {T}], got {tuple(position_ids.shape)}")
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: position_ids must be int64 or int32, got {position_ids.dtype}")
    for name, t in (("k", k), ("position_ids", position_ids)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    for name, t in (("q", q), ("k", k)):
        if not _packed_heads(t):
            raise ValueError(
                f"{op}: {name} must have contiguous [heads, Hd] per token (strides (..., Hd, 1)), "
                f"got shape {tuple(t.shape)} strides {t.stride()}"
            )
    if not theta > 0:
        raise ValueError(f"{op}: theta must be positive, got {theta}")
    if scaling is not None and not (
        scaling.factor >= 1
        and 0 < scaling.low_freq_factor < scaling.high_freq_factor
        and scaling.original_max_seq_len > 0
    ):
        raise ValueError(
            f"{op}: scaling needs factor >= 1, 0 < low_freq_factor < high_freq_factor and "
            f"original_max_seq_len > 0, got {scaling}"
        )


def rotary_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    theta: float,
    sign: int,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by sign·θ in one launch -> new contiguous (q_out, k_out)."""
    B, T, H, Hd = q.shape
    K = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous whatever q's token strides
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    inv_freq = _cached_inv_freq(Hd, float(theta), q.device, scaling)
    block_hq, block_hk, block_hd, num_warps = _settings(H, K, Hd)
    if B * T > 0:
        # fmt: off
        _rotary_kernel[(B * T,)](
            q, k, position_ids, inv_freq, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            position_ids.stride(0), position_ids.stride(1),
            T, H, K, Hd,
            SIGN=sign, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HD=block_hd, num_warps=num_warps,
            enable_fp_fusion=True,
        )
        # fmt: on
    return q_out, k_out


# ---------------------------------------------------------------------------------------------------------
# autograd


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float, scaling: RopeScaling | None
    ):
        ctx.save_for_backward(position_ids)
        ctx.theta, ctx.scaling = theta, scaling
        return rotary_launch(q, k, position_ids, theta, sign=1, scaling=scaling)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        (position_ids,) = ctx.saved_tensors
        dq = dq if _packed_heads(dq) else dq.contiguous()
        dk = dk if _packed_heads(dk) else dk.contiguous()
        dq, dk = rotary_launch(dq, dk, position_ids, ctx.theta, sign=-1, scaling=ctx.scaling)
        return dq, dk, None, None, None


# ---------------------------------------------------------------------------------------------------------
# public function


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, H, Hd], k [B, T, K, Hd], position_ids [B, T] -> rotated (q, k), through one Triton launch."""
    _check(q, k, position_ids, theta, scaling)
    return RotaryFunction.apply(q, k, position_ids, theta, scaling)
