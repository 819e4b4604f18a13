"""Causal grouped-query attention's opt-in Hopper forward, through tensor descriptors (TMA).

The O and lse of attention.py's pointer forward (`_attn_fwd_kernel`; equal to rounding, its tiles differ),
from the same inputs, for the same backward: Q, K, V are read and O written by the copy engine, through one tensor descriptor per
(batch row, head) over that head's [T, Hd] slab, instead of per-thread pointer loads. TMA fills rows at or
past T with zeros on load and drops them on store, so a tile that runs past the row's end needs no mask
(pointer masks are left only for the softmax's causal/document mask), and it can never read the next batch
row's tokens, which a descriptor over a flattened [B·T, ·] view would. Descriptors need compute capability
9.0 and 16-byte aligned bases and strides (`_tma_layout_problem`): where they are missing the launcher
raises, never falling back to the pointer kernel. The formulas, what is saved and what recomputed, the
dtype policy and the document index are attention.py's (its module docstring), and so is the reference
this forward is tested against (`attention_reference`).

Not the default. On an H200 (Triton 3.6, bf16, 32 heads, Hd 128) it ran at 0.75× (T 1024) to 0.96× (GQA,
T 8192) the pointer forward's speed, 0.86× on packed rows; its best sweep tile there, 64 × 64 × 4 warps ×
3 stages, was still behind the pointer kernel's (benchmarks/RESULTS.md). The default is decided in
c2a/kernels/__init__.py: `causal_attention` reads C2A_ATTN_FWD = pointer (or unset) | tma | tma_ws and
calls `attention.flash_attention` or `flash_attention_tma` here (warp_specialize for "tma_ws").

"tma_ws" warp-specialises the bulk loop (`tl.range(..., warp_specialize=True)`), for a Triton that can
split it on Hopper; 3.6 and 3.9 cannot. They pass `warp_specialize` on sm_90 to their Hopper pass
(NVGPUWarpSpecialization), which at 8 warps leaves this loop unpartitioned (TTGIR without
ttg.warp_specialize: the "tma" build, register for register) and at 4 warps aborts on an MLIR dominance
assertion; the Triton tutorial (python/tutorials/06-fused-attention.py) tests warp_specialize on Blackwell
only. `benchmarks/attention.py --compile-only` reports the partitions it gets.

This module imports attention.py for the helpers both forwards share; attention.py never imports it.
Kernels first, then the launcher, the autograd.Function and the public function.
"""

from __future__ import annotations

import math

import torch

from ._triton import tl, triton
from .attention import (
    _M_FLOOR,
    Documents,
    FlashAttentionFunction,
    _Blocks,
    _check_blocks,
    _check_inputs,
    _dot_precision,
    _empty,
    _fwd_blocks,
    _fwd_key_ranges,
    _head_dim_contiguous,
    _interpreting,
    _mma_dtype,
    _strides,
)

# Layout, strides and the base-2 softmax as in attention.py's kernels (the comment above its `_M_FLOOR`).


# fmt: off
@triton.jit
def _fwd_tiles_tma(
    acc, l_i, m_i, q,
    k_desc, v_desc,
    offs_m, doc_q, lo, hi, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, MMA_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """`_fwd_tiles` with K and V tiles [BLOCK_N, Hd] loaded through descriptors. Keys at or past T arrive as
    zeros: on masked tiles the causal mask hides them from real rows (s <= t < T); unmasked tiles end at or
    before the query tile's start, so they never reach T. WARP_SPECIALIZE lets Triton split the loop into
    a TMA producer and MMA/softmax consumer partitions (`tl.range(..., warp_specialize=True)`)."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([start_n, 0]).to(MMA_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= doc_q[:, None])
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            s = s - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            s = s * qk_scale - m_new[:, None]
        p = tl.math.exp2(s)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([start_n, 0]).to(MMA_DTYPE)
        acc = tl.dot(p.to(MMA_DTYPE), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i
# fmt: on


# fmt: off
@triton.jit
def _attn_fwd_tma_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, doc_start_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, H, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """`_attn_fwd_kernel` through tensor descriptors: the same grid (cdiv(T, BLOCK_M), B·H), heaviest query
    tiles first, and the same three key ranges (masked document-start tiles, the unmasked bulk, the masked
    diagonal). Only the bulk loop is warp-specialised (WARP_SPECIALIZE): it is where the time goes, and the
    masked ranges hold one or two tiles each."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv_h = h // GROUP
    b64 = b.to(tl.int64)

    # one [T, Hd] descriptor per operand and (batch row, head); the last stride is the literal 1 TMA requires
    q_desc = tl.make_tensor_descriptor(q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh, shape=[T, HEAD_DIM],
                                       strides=[stride_qt, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(k_ptr + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh,
                                       shape=[T, HEAD_DIM], strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr + b64 * stride_vb + kv_h.to(tl.int64) * stride_vh,
                                       shape=[T, HEAD_DIM], strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(o_ptr + b64 * stride_ob + h.to(tl.int64) * stride_oh, shape=[T, HEAD_DIM],
                                       strides=[stride_ot, 1], block_shape=[BLOCK_M, HEAD_DIM])

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q = q_desc.load([m0, 0]).to(MMA_DTYPE)  # rows past T are zeros

    hi = tl.minimum(m0 + BLOCK_M, T)
    doc_q, lo, mid_lo, mid_hi = _fwd_key_ranges(doc_start_ptr, b64, T, m0, hi, offs_m, row_ok, BLOCK_M, BLOCK_N, PACKED)

    m_i = tl.full([BLOCK_M], _M_FLOOR, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, doc_q, lo, mid_lo, qk_scale,
                                   BLOCK_N, True, False, MMA_DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, doc_q, mid_lo, mid_hi, qk_scale,
                                   BLOCK_N, False, WARP_SPECIALIZE, MMA_DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, doc_q, mid_hi, hi, qk_scale,
                                   BLOCK_N, True, False, MMA_DTYPE, DOT_PRECISION)

    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # rows past T (l_i = 0) stay finite; the descriptor drops them
    o = acc / l_i[:, None]
    o_desc.store([m0, 0], o.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
# fmt: on


# ---------------------------------------------------------------------------------------------------------
# Launcher: tile sizes, the layout check, allocation, the launch.
# ---------------------------------------------------------------------------------------------------------


def _fwd_tma_blocks(head_dim: int, dtype: torch.dtype) -> _Blocks:
    if _interpreting() or dtype == torch.float32:
        return _fwd_blocks(head_dim, dtype)  # the pointer forward's small test tiles
    # 128 × 128 tiles, 8 warps (two warp groups of 64 query rows each; the Triton tutorial keeps 8 warps on
    # Hopper only for tiles of at least 128 × 128). Without address tensors for the tiles the pointer kernel
    # needed 255 registers for, the doubled key tile fits. sm_90a, bf16, T 4096, MHA 32:32 and GQA 64:8
    # (`benchmarks/attention.py --compile-only`), registers unpacked / packed, Triton 3.9 (3.6):
    #   Hd 128, 128 × 128, 2 stages: 194 / 228 (215 / 205), 0 spills, 161 KiB, tensor-core ratio 1.00;
    #           3 stages: 225 KiB, at the edge of the 227 KiB an H100 block may have, for the same registers;
    #           128 × 64, 3 stages: 138 / 156 (150 / 151), 0 spills, 129 KiB (the pointer kernel's tile).
    #   Hd 64, 128 × 128, 3 stages: 158 / 196, 0 spills, 113 KiB; 128 × 64: 109 / 121, 65 KiB; 4 warps: 214.
    # Timed on an H200 (Triton 3.6): 0.75-0.96x the pointer forward's speed (dense, T 1k-8k), 0.86x on packed
    # rows; the sweep's best tile, 64 × 64 × 4 warps × 3 stages, ran packed rows in 0.537 ms against the pointer
    # kernel's 0.461 (benchmarks/RESULTS.md). Hence opt-in (module docstring).
    if head_dim <= 64:
        return _Blocks(128, 128, 8, 3)
    return _Blocks(128, 128, 8, 2)


def _tma_layout_problem(tensors: dict[str, torch.Tensor], capability: tuple[int, int] | None) -> str | None:
    """Why the descriptor forward cannot read these [B, T, heads, Hd] tensors, or None if it can.

    TMA needs compute capability 9.0 (Hopper) and, per descriptor, a 16-byte aligned base and 16-byte
    multiples for every stride but the last (which is 1). Each (batch row, head) descriptor starts at
    data_ptr + b·stride_b + h·stride_h, so the batch and head strides must be 16-byte multiples too.
    `capability` is None off CUDA (the interpreter, or meta tensors for compile-only builds).
    """
    if capability is not None and capability < (9, 0):
        return f"tensor descriptors (TMA) need compute capability 9.0 or newer, this GPU has {capability[0]}.{capability[1]}"
    for name, x in tensors.items():
        size = x.element_size()
        if x.data_ptr() % 16:
            return f"{name}'s data pointer is not 16-byte aligned (offset {x.data_ptr() % 16} B)"
        strides = dict(zip(("batch", "token", "head"), _strides(x)))
        for dim, stride in strides.items():
            if stride * size % 16:
                return f"{name}'s {dim} stride is {stride * size} B, not a multiple of 16 B"
    return None


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # global memory for the descriptors `tl.make_tensor_descriptor` builds on the device (128 B each)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def attention_forward_tma(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_start: torch.Tensor | None,
    warp_specialize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention.attention_forward` through `_attn_fwd_tma_kernel`: the same arguments, the same o [B, T, H, Hd]
    in q's dtype and lse [B, H, T] fp32. `warp_specialize` asks Triton to split the bulk loop (module
    docstring). Raises ValueError where the GPU or the tensors' layout cannot have descriptors."""
    q, k, v = (_head_dim_contiguous(x) for x in (q, k, v))
    B, T, H, Hd = q.shape
    K = k.shape[2]
    o = _empty((B, T, H, Hd), q.dtype, q.device)
    lse = _empty((B, H, T), torch.float32, q.device)
    capability = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
    problem = _tma_layout_problem({"q": q, "k": k, "v": v, "o": o}, capability)
    if problem is not None:
        variant = "tma_ws" if warp_specialize else "tma"
        raise ValueError(
            f"flash_attention_tma (C2A_ATTN_FWD={variant}) cannot run here: {problem}; "
            "unset C2A_ATTN_FWD for the pointer forward, which reads any layout"
        )
    blocks = _fwd_tma_blocks(Hd, q.dtype)
    _check_blocks(blocks, blocks.block_m, blocks.block_n, "TMA forward")
    if q.device.type == "cuda":
        triton.set_allocator(_tma_scratch)  # device-side descriptors live in a scratch buffer Triton asks for
    sm_scale = 1.0 / math.sqrt(Hd)
    grid = (triton.cdiv(T, blocks.block_m), B * H)
    # fmt: off
    _attn_fwd_tma_kernel[grid](
        q, k, v, o, lse, q if doc_start is None else doc_start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        T, H, H // K, sm_scale * math.log2(math.e),
        HEAD_DIM=Hd, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, PACKED=doc_start is not None,
        WARP_SPECIALIZE=warp_specialize, MMA_DTYPE=_mma_dtype(q.dtype), DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, enable_fp_fusion=True,
    )
    # fmt: on
    return o, lse


# ---------------------------------------------------------------------------------------------------------
# autograd.Function and the public function.
# ---------------------------------------------------------------------------------------------------------


class FlashAttentionTmaFunction(torch.autograd.Function):
    """`FlashAttentionFunction` with this module's forward: the same saved tensors, the same backward."""

    @staticmethod
    def forward(ctx, q, k, v, doc_start, doc_end, warp_specialize):  # type: ignore[override]
        o, lse = attention_forward_tma(q, k, v, doc_start, warp_specialize)
        ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        return (*FlashAttentionFunction.backward(ctx, do), None)  # None: no gradient for warp_specialize


def flash_attention_tma(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor | Documents | None = None,
    warp_specialize: bool = False,
) -> torch.Tensor:
    """`attention.flash_attention` with the forward through tensor descriptors: the same contract (shapes,
    dtypes, documents, differentiable in q, k, v, no host sync), compute capability 9.0 or newer on a GPU."""
    documents = Documents.of(position_ids)
    _check_inputs(q, k, v, documents.position_ids)
    if q.numel() == 0:
        return q.clone()  # nothing to attend; keeps the graph to q
    doc_start, doc_end = documents.index()
    return FlashAttentionTmaFunction.apply(q, k, v, doc_start, doc_end, warp_specialize)
