"""Causal grouped-query attention over packed documents.

softmax(q·kᵀ / sqrt(Hd) + mask) · v, where query t of a row attends to keys s ≤ t of the same document.
A document starts at t = 0 and wherever `position_ids` restarts at 0; `position_ids=None` means one
document per row. Each of the K key/value heads serves H/K consecutive query heads (Llama-2 70B: 64/8).

Torch reference first (scaled_dot_product_attention per document: no [T, T] mask is built, and no FLOPs
are spent across documents), then a FlashAttention-2 kernel in Triton (Dao 2023, arXiv:2307.08691):

Forward, per query tile, streaming key/value tiles with an online softmax (running max m and sum l, fp32):
    S = Q Kᵀ / sqrt(Hd) + mask,  O = softmax(S) V,  L = logsumexp(S)  (saved; base 2, see the kernels)
Backward, with P recomputed tile by tile from Q, K and L (the [T, T] matrices never exist):
    delta = rowsum(dO ∘ O),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − delta),
    dQ = dS K / sqrt(Hd),  dK = dSᵀ Q / sqrt(Hd)
One program per (key tile, query head) visits the query tiles that can see its keys and accumulates dK and
dV in registers. dQ, which sums over key tiles, is finished one of two ways:
  atomic (default, FA2's one pass): each (key tile, query tile) pair adds its dS K into an fp32 [B, T, H, Hd]
    buffer with atomic adds, then one elementwise kernel scales and casts it. 5 matmuls per tile pair
    (Q Kᵀ, Pᵀ dO, dO Vᵀ, dSᵀ Q, dS K). The adds land in a varying order, so dQ differs between runs in
    its last bits.
  deterministic (when `torch.are_deterministic_algorithms_enabled()`, e.g. train.deterministic): a second
    pass, one program per query tile, recomputes P and dP (Q Kᵀ, dO Vᵀ) and accumulates dS K in
    registers. 7 matmuls per tile pair (4 + 3), bitwise reproducible.
Saved for backward: q, k, v, o and L [B, H, T] fp32. Recomputed: P (and, on the deterministic path, dP).
Dtypes: matmul operands in the input dtype (bf16/fp16) with fp32 accumulation; softmax statistics, delta
and the dQ/dK/dV accumulators in fp32 (the atomic dQ buffer too, and under GQA the per-query-head dK/dV
summed over each group); outputs in the input dtype. fp32 inputs (CPU tests) use IEEE fp32 dots. Under
Triton's CPU interpreter every dot runs in fp32 (its bf16 arithmetic is wrong in Triton 3.9), and
programs run one at a time, so the atomic path's races cannot show there: they are reasoned about at the
atomic add.

Documents reach the kernels not as cu_seqlens (whose lengths live on the host) but as each token's
document start and end (`_document_index`, built on the device with running max/min): a query tile reads
the start of its first and last rows and skips key tiles before them, a key tile reads the end of its
documents and skips the query tiles after. Causal tiles above the diagonal are never visited; masks are
computed only on diagonal tiles and tiles that straddle a document start. The model builds a `Documents`
once per forward, so the index is made once for all layers and their checkpoint recompute.

The forward here reads its tiles through pointers (`_attn_fwd_kernel`, any GPU), and it is the default.
An opt-in forward for Hopper, through tensor descriptors (TMA), lives in attention_tma.py: the same O and
lse for this module's backward, slower on an H200. `c2a.kernels.causal_attention` (c2a/kernels/__init__.py)
decides which runs, from C2A_ATTN_FWD; attention_tma.py imports this module's helpers, never the reverse.

Grouped-query attention is native: query head h reads K/V head h // (H/K) through strides (no repeat).
The dK/dV pass runs one program per query head and sums each group's dK, dV afterwards (see
`_attn_bwd_dkdv_kernel` for why not a loop over the group). Every grid puts the tiles of a sequence on
axis 0 and batch × head on axis 1, so programs resident together share one head's K/V (or Q/dO) in L2.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton


def document_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of its documents. Reads position_ids on the host."""
    starts = position_ids == 0
    starts[:, 0] = True
    bounds = []
    T = position_ids.shape[1]
    for row in starts.cpu():
        s = row.nonzero().flatten().tolist()
        bounds.append(list(zip(s, s[1:] + [T])))
    return bounds


class Documents:
    """The packed-document layout of a batch, shared by every attention layer of one model forward.

    Built once per forward from position_ids ([B, T], or None for one document per row). What the layers
    derive from it is computed by the first layer that asks and reused by the others, and by activation-
    checkpoint recompute, which is handed the same object: the kernels' per-token index
    (`_document_index`, about 12 small launches) and the reference's [start, end) spans (one device-to-host
    copy). Built per layer, a 32-layer model with checkpointing would pay both 64 times per step.
    """

    def __init__(self, position_ids: torch.Tensor | None) -> None:
        self.position_ids = position_ids
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bounds: list[list[tuple[int, int]]] | None = None

    @staticmethod
    def of(position_ids: torch.Tensor | Documents | None) -> Documents:
        return position_ids if isinstance(position_ids, Documents) else Documents(position_ids)

    def index(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(doc_start, doc_end) int32 [B, T] on position_ids' device (see `_document_index`); (None, None)
        for one document per row."""
        if self.position_ids is None:
            return None, None
        if self._index is None:
            self._index = _document_index(self.position_ids)
        return self._index

    def bounds(self) -> list[list[tuple[int, int]]] | None:
        """`document_bounds(position_ids)`, read from the device once; None for one document per row."""
        if self.position_ids is None:
            return None
        if self._bounds is None:
            self._bounds = document_bounds(self.position_ids)
        return self._bounds


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | Documents | None = None
) -> torch.Tensor:
    """q [B, T, H, Hd], k and v [B, T, K, Hd], position_ids [B, T] (or their Documents) or None -> [B, T, H, Hd]."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, T, Hd]
    gqa = q.shape[1] != k.shape[1]
    bounds = Documents.of(position_ids).bounds()
    if bounds is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)
    if all(len(spans) == 1 for spans in bounds):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)
    rows = []
    for b, spans in enumerate(bounds):
        docs = [
            F.scaled_dot_product_attention(
                q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], is_causal=True, enable_gqa=gqa
            )
            for s, e in spans
        ]
        rows.append(torch.cat(docs, dim=2))  # [1, H, T, Hd]
    return torch.cat(rows, dim=0).transpose(1, 2)  # [B, T, H, Hd]


# ---------------------------------------------------------------------------------------------------------
# Triton kernels.
#
# Layout: q, dq [B, T, H, Hd]; k, v, dk, dv [B, T, K, Hd], any strides with the head dim contiguous (the
# kernels read the model's [B, T, heads, Hd] views directly: one row of a tile is Hd contiguous elements,
# 128 or 256 bytes at Hd 64/128 in bf16, a full memory transaction, so no transpose copy is needed).
# lse, delta [B, H, T] fp32, contiguous. doc_start, doc_end [B, T] int32, contiguous (see _document_index).
# Softmax runs in base 2: scores are pre-multiplied by qk_scale = log2(e)/sqrt(Hd), so exp2 replaces exp
# (one MUFU.EX2 instead of a multiply and an EX2) and lse is stored as log2 of the row's softmax normaliser.
# ---------------------------------------------------------------------------------------------------------

# Running-max floor instead of -inf: a query row can meet a key tile in which every key is masked (keys
# before its document, or past T), and exp2(-inf - -inf) would be NaN. With a finite floor, masked scores
# (-inf) give exp2(-inf) = 0 and the rescale factor exp2(m_old - m_new) stays finite. Real scores are far
# above it: |q·k| / sqrt(Hd) is bounded by the bf16/fp16 range of the inputs.
_M_FLOOR = tl.constexpr(-1.0e30)


# fmt: off
@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kt, stride_vt,
    offs_m, doc_q, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MMA_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Streams key/value tiles [lo, hi) through the online softmax of one query tile.

    MASKED=False is the bulk of the work (keys that every query of the tile may see): no mask arithmetic,
    no bounds checks. MASKED=True is for the diagonal tile(s) and the tiles that straddle a document start.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0).to(MMA_DTYPE)
        else:
            k = tl.load(k_ptrs).to(MMA_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if MASKED:
            # key s is visible to query t iff doc_start[t] <= s <= t (for real rows t < T, so s < T too)
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= doc_q[:, None])
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            s = s - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            s = s * qk_scale - m_new[:, None]
        p = tl.math.exp2(s)
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old running max
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0).to(MMA_DTYPE)
        else:
            v = tl.load(v_ptrs).to(MMA_DTYPE)
        acc = tl.dot(p.to(MMA_DTYPE), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i
# fmt: on


# fmt: off
@triton.jit
def _fwd_key_ranges(doc_start_ptr, b64, T, m0, hi, offs_m, row_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PACKED: tl.constexpr):
    """(doc_q, lo, mid_lo, mid_hi): each query row's document start, and the key-tile ranges of a query tile
    [m0, hi), for both forward kernels (this module's and attention_tma.py's): [lo, mid_lo) masked (tiles
    holding a document start of some query of the tile), [mid_lo, mid_hi) unmasked, [mid_hi, hi) masked
    (the diagonal)."""
    if PACKED:
        doc_row = doc_start_ptr + b64 * T
        doc_q = tl.load(doc_row + offs_m, mask=row_ok, other=0)
        # doc_start is non-decreasing in t, so the tile's first and last rows hold its min and max
        first_doc = tl.load(doc_row + m0)
        last_doc = tl.load(doc_row + hi - 1)
        lo = (first_doc // BLOCK_N) * BLOCK_N
        mid_lo = tl.minimum(tl.cdiv(last_doc, BLOCK_N) * BLOCK_N, hi)
        mid_hi = tl.maximum(mid_lo, m0)
    else:
        doc_q = tl.zeros([BLOCK_M], dtype=tl.int32)
        lo = 0
        mid_lo = 0
        mid_hi = m0
    return doc_q, lo, mid_lo, mid_hi
# fmt: on


# fmt: off
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, doc_start_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, H, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (query tile of BLOCK_M tokens, batch row, query head); grid (cdiv(T, BLOCK_M), B·H).

    Query tiles run on grid axis 0, so the programs resident together are tiles of one head and read the
    same K and V from L2 (with batch·head on axis 0 they were different heads' tiles, sharing nothing).
    Heaviest tiles first: causal work grows with the tile index, so a head's tiles are issued last-to-first.
    Key tiles split in three ranges (BLOCK_M is a multiple of BLOCK_N):
      [lo, mid_lo)      masked: tiles that contain a document start of some query in the tile;
      [mid_lo, mid_hi)  unmasked: every key visible to every query of the tile;
      [mid_hi, hi)      masked: the diagonal, where causality cuts the tile.
    Tiles before the earliest document start of the tile, or after its last query, are never visited.
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv_h = h // GROUP  # grouped-query attention: heads [kv_h·GROUP, (kv_h+1)·GROUP) share this K/V head
    b64 = b.to(tl.int64)  # base offsets in int64: B·T·H·Hd passes 2^31 at long context

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q_base = q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kv_h.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(MMA_DTYPE)

    hi = tl.minimum(m0 + BLOCK_M, T)
    doc_q, lo, mid_lo, mid_hi = _fwd_key_ranges(doc_start_ptr, b64, T, m0, hi, offs_m, row_ok, BLOCK_M, BLOCK_N, PACKED)

    m_i = tl.full([BLOCK_M], _M_FLOOR, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, doc_q,
                               lo, mid_lo, T, qk_scale, HEAD_DIM, BLOCK_N, True, MMA_DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, doc_q,
                               mid_lo, mid_hi, T, qk_scale, HEAD_DIM, BLOCK_N, False, MMA_DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, doc_q,
                               mid_hi, hi, T, qk_scale, HEAD_DIM, BLOCK_N, True, MMA_DTYPE, DOT_PRECISION)

    # Every real row (t < T) saw at least its own key, so l_i > 0 there; rows past T have l_i = 0 and
    # are not stored, but are kept finite anyway.
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_i[:, None]
    o_base = o_ptr + b64 * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
# fmt: on


# fmt: off
@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, t] = Σ_d dO[b, t, h, d] · O[b, t, h, d] in fp32; grid (cdiv(T, BLOCK_M), B·H)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < T
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)
# fmt: on


# fmt: off
@triton.jit
def _dkdv_tiles(
    dk, dv, k, v,
    q_base, do_base, dq_base, lse_base, delta_base, doc_row, stride_qt, stride_dot, stride_dqt,
    offs_n, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PACKED: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulates one query head's contribution to dK, dV of a key tile over query tiles [lo, hi).

    Works on the transposed scores (keys × queries) so dK, dV accumulate as [BLOCK_N, Hd] without
    transposing them: Pᵀ = exp2(K Qᵀ·qk_scale − lse), dV += Pᵀ dO, dPᵀ = V dOᵀ,
    dSᵀ = Pᵀ ∘ (dPᵀ − delta), dK += dSᵀ Q (the 1/sqrt(Hd) is applied once, at the end); with ATOMIC_DQ
    also dQ += dS K into the fp32 buffer at dq_base (unscaled too: the cast kernel scales it).
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]
        if MASKED:
            row_ok = offs_m < T
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(MMA_DTYPE)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs).to(MMA_DTYPE)
            lse = tl.load(lse_base + offs_m)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            # query t sees key s iff doc_start[t] <= s <= t and t < T; where() (not a product) so an inf
            # from a masked pair never reaches the sums
            visible = (offs_m[None, :] >= offs_n[:, None]) & row_ok[None, :]
            if PACKED:
                doc_q = tl.load(doc_row + offs_m, mask=row_ok, other=0)
                visible = visible & (offs_n[:, None] >= doc_q[None, :])
            p_t = tl.where(visible, p_t, 0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0).to(MMA_DTYPE)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            do = tl.load(do_ptrs).to(MMA_DTYPE)
            delta = tl.load(delta_base + offs_m)
        dv = tl.dot(p_t.to(MMA_DTYPE), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(MMA_DTYPE)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            # dQ += dS K, as dQᵀ = Kᵀ dSᵀ [Hd, BLOCK_M] so that Hd (not the 32-query tile) is the M dim of
            # the tensor-core op. Programs of other key tiles add into the same dQ rows at the same time:
            # fp32 atomic adds lose no update, only their order varies (so dQ is not bitwise reproducible);
            # "relaxed" because nothing reads dQ before the kernel ends.
            dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION)
            dq_ptrs = dq_base + offs_m[None, :] * stride_dqt + offs_d[:, None]
            if MASKED:
                tl.atomic_add(dq_ptrs, dq_t, mask=row_ok[None, :], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq_t, sem="relaxed")
    return dk, dv
# fmt: on


# fmt: off
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, doc_end_ptr, doc_start_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_dqb, stride_dqt, stride_dqh,
    T, H, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (key tile of BLOCK_N tokens, batch row, query head); grid (cdiv(T, BLOCK_N), B·H).

    A program serves one query head, not the GROUP heads of its K/V head (FA2's choice): dK and dV of the
    query head go to a [B, T, H, Hd] fp32 buffer that the launcher sums over each group (with GROUP = 1,
    straight to dk and dv). Looping over the group inside the program instead gives GQA kernels their own
    register allocation, which spilled where MHA's did not: sm_90a, Hd 128, 64 keys × 32 queries, 8 warps,
    atomic dQ, packed: the loop at 32:8 heads 255 registers and 168 B spilled (MHA 212, 0 B); one program
    per head at 64:8 (70B) 209 registers, 0 B, as MHA (`benchmarks/attention.py --compile-only`, Triton 3.9).
    The price is the buffers' traffic, 2 · 4 B · T · H · Hd written and read once per backward (GQA only).
    Key tiles run on grid axis 0, so the programs resident together are one head's key tiles, sharing
    its Q and dO in L2; tile 0 has the most causal work and is issued first.
    Query tiles split in three ranges (BLOCK_N is a multiple of BLOCK_M, and query tiles start at the key
    tile's start n0):
      [n0, c_hi)        masked: the diagonal;
      [c_hi, full_hi)   unmasked: queries of the document holding key n0, past the diagonal;
      [full_hi, t_hi)   masked: the query tile where that document (or a later key's) ends.
    Queries in later documents, which never see these keys, are never visited.
    """
    n0 = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kv_h = h // GROUP
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < T
    k = tl.load(k_ptr + b64 * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=key_ok, other=0.0).to(MMA_DTYPE)
    v = tl.load(v_ptr + b64 * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=key_ok, other=0.0).to(MMA_DTYPE)

    if PACKED:
        # doc_end[t]: exclusive end of t's document; non-decreasing, so the first and last keys of the
        # tile bound the queries that can see any of its keys
        end_first = tl.load(doc_end_ptr + b64 * T + n0)
        end_last = tl.load(doc_end_ptr + b64 * T + tl.minimum(n0 + BLOCK_N, T) - 1)
    else:
        end_first = T
        end_last = T
    t_hi = tl.cdiv(end_last, BLOCK_M) * BLOCK_M
    c_hi = tl.minimum(n0 + BLOCK_N, t_hi)
    full_hi = tl.maximum(c_hi, (end_first // BLOCK_M) * BLOCK_M)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    doc_row = doc_start_ptr + b64 * T
    q_base = q_ptr + b64 * stride_qb + h * stride_qh
    do_base = do_ptr + b64 * stride_dob + h * stride_doh
    dq_base = dq_ptr + b64 * stride_dqb + h * stride_dqh
    lse_base = lse_ptr + pid_bh.to(tl.int64) * T
    delta_base = delta_ptr + pid_bh.to(tl.int64) * T
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, doc_row,
                         stride_qt, stride_dot, stride_dqt, offs_n, n0, c_hi, T, qk_scale,
                         HEAD_DIM, BLOCK_M, True, PACKED, ATOMIC_DQ, MMA_DTYPE, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, doc_row,
                         stride_qt, stride_dot, stride_dqt, offs_n, c_hi, full_hi, T, qk_scale,
                         HEAD_DIM, BLOCK_M, False, PACKED, ATOMIC_DQ, MMA_DTYPE, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, doc_row,
                         stride_qt, stride_dot, stride_dqt, offs_n, full_hi, t_hi, T, qk_scale,
                         HEAD_DIM, BLOCK_M, True, PACKED, ATOMIC_DQ, MMA_DTYPE, DOT_PRECISION)

    dk = dk * sm_scale
    dk_base = dk_ptr + b64 * stride_dkb + h * stride_dkh
    dv_base = dv_ptr + b64 * stride_dvb + h * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=key_ok)
    tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=key_ok)
# fmt: on


# fmt: off
@triton.jit
def _attn_bwd_dq_cast_kernel(acc_ptr, dq_ptr, n, sm_scale, BLOCK: tl.constexpr):
    """dq = acc · sm_scale in dq's dtype, over n contiguous elements: the atomic path's fp32 dQ accumulator
    (which holds dS K without the 1/sqrt(Hd), applied here once instead of once per tile pair)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(acc_ptr + offs, mask=offs < n)
    tl.store(dq_ptr + offs, (acc * sm_scale).to(dq_ptr.dtype.element_ty), mask=offs < n)
# fmt: on


# fmt: off
@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta,
    k_base, v_base, stride_kt, stride_vt,
    offs_m, doc_q, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ += dS K over key tiles [lo, hi), with P = exp2(Q Kᵀ·qk_scale − lse), dS = P ∘ (dO Vᵀ − delta)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0).to(MMA_DTYPE)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0).to(MMA_DTYPE)
        else:
            k = tl.load(k_ptrs).to(MMA_DTYPE)
            v = tl.load(v_ptrs).to(MMA_DTYPE)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= doc_q[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(MMA_DTYPE), k, dq, input_precision=DOT_PRECISION)
    return dq
# fmt: on


# fmt: off
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    T, H, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (query tile, batch row, query head); the grid order and key ranges of the forward."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv_h = h // GROUP
    b64 = b.to(tl.int64)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(MMA_DTYPE)
    do = tl.load(do_ptr + b64 * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(MMA_DTYPE)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kv_h.to(tl.int64) * stride_vh

    hi = tl.minimum(m0 + BLOCK_M, T)
    if PACKED:
        doc_row = doc_start_ptr + b64 * T
        doc_q = tl.load(doc_row + offs_m, mask=row_ok, other=0)
        lo = (tl.load(doc_row + m0) // BLOCK_N) * BLOCK_N
        mid_lo = tl.minimum(tl.cdiv(tl.load(doc_row + hi - 1), BLOCK_N) * BLOCK_N, hi)
        mid_hi = tl.maximum(mid_lo, m0)
    else:
        doc_q = tl.zeros([BLOCK_M], dtype=tl.int32)
        lo = 0
        mid_lo = 0
        mid_hi = m0

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, doc_q, lo, mid_lo, T,
                   qk_scale, HEAD_DIM, BLOCK_N, True, MMA_DTYPE, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, doc_q, mid_lo, mid_hi, T,
                   qk_scale, HEAD_DIM, BLOCK_N, False, MMA_DTYPE, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, doc_q, mid_hi, hi, T,
                   qk_scale, HEAD_DIM, BLOCK_N, True, MMA_DTYPE, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(dq_ptr + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])
# fmt: on


# ---------------------------------------------------------------------------------------------------------
# Launcher: validation, document index, tile sizes, allocation, launches.
# ---------------------------------------------------------------------------------------------------------

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs >= 16; tl.arange needs a power of two
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (axis 0 allows 2^31 - 1)

# Tests set this to fill every buffer the kernels write (O, lse, delta, dQ, dK, dV) with NaN before the
# launch, so an element a kernel forgets to write cannot pass by holding a plausible stale value.
_POISON_OUTPUTS = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class _Blocks:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


# Tile sizes, one function per kernel. Under the interpreter (CPU tests) the tiles are small and unequal so
# that T <= 128 crosses many tile, diagonal and document boundaries; warps/stages do not matter there.
# GPU choices are for bf16/fp16 on Hopper (H100: 228 KiB shared memory, 64K registers per SM). Two
# measurements, quoted per kernel below: the compiled code, from `benchmarks/attention.py --compile-only`,
# which builds each kernel, as its launcher launches it, for sm_90a on a CPU machine (Triton 3.9, ptxas 13.4)
# and reports registers, spills and shared memory, for the packed variant (the unpacked one needs no more)
# with GQA 32:8 heads; MHA (Llama-2 7B/13B, where the group of one specialises away) needs no more either.
# And times on an H200 (Triton 3.6) from `benchmarks/attention.py --sweep`. Among the shapes the FA2 paper
# and the Triton tutorial use, the picks are those that compile without register spills, or with the fewest,
# and of those the fastest timed. fp32 inputs (tests on a GPU) take the interpreter's small tiles and 2
# stages: IEEE fp32 dots run on FMA units, not wgmma, and larger tiles spill kilobytes (64 × 32 forward at
# Hd 64: 1292 B).


# GPUs whose blocks may use at most 99 KiB of shared memory (GeForce/RTX Ampere, Ada and Blackwell); the A100
# (sm_80) and Jetson Orin (sm_87) allow 163 KiB, Hopper and B200 227 KiB.
_SMALL_SHARED_MEMORY = {(8, 6), (8, 9), (12, 0), (12, 1)}


def _target_capability() -> tuple[int, int]:
    """The compute capability the tiles are chosen for: the current CUDA device's; Hopper's (9, 0) where
    there is none (the compile-only reports build for other targets by replacing this function)."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)


def _fwd_blocks(head_dim: int, dtype: torch.dtype) -> _Blocks:
    if _interpreting():
        return _Blocks(32, 16, 4, 1)
    if dtype == torch.float32:
        return _Blocks(32, 16, 4, 2)
    # Hd 64: 128 × 64 tiles (FA2 §3.3; the Triton tutorial's Hopper shape), 8 warps, 3 stages: sm_90a 166
    # registers, 0 spills, 64 KiB shared; 4 warps spill 20 B.
    # Hd 128: 64 × 64 tiles, one warp group (4 warps), 3 stages: sm_90a 242 registers, 0 spills, 112 KiB.
    # Timed on an H200 (benchmarks/gpu_check.sh's sweep, Triton 3.6, forward ms at B 4 × T 4096 × 32 heads):
    # dense 1.276 against 1.309 and 1.287 (two runs) for the 128 × 64 × 8 warps tile it replaced; packed
    # Alpaca-like rows 0.461 against 0.576, as a 64-row query tile crosses fewer document edges.
    # Also timed: 128 × 128 × 8 warps × 2 stages 1.378 / 0.652, 128 × 32 × 8 × 3 1.361 / 0.624.
    if head_dim <= 64:
        return _Blocks(128, 64, 8, 3)
    return _Blocks(64, 64, 4, 3)


def _bwd_dkdv_blocks(head_dim: int, dtype: torch.dtype) -> _Blocks:
    if _interpreting():
        return _Blocks(16, 32, 4, 1)
    if dtype == torch.float32:
        return _Blocks(16, 32, 4, 2)
    # K, V and the fp32 dK, dV accumulators stay resident: 2 · BLOCK_N · Hd · (2 + 4) B, so the key tile
    # is what registers allow. Four of the five dots per tile pair have the key tile as their M dimension
    # (the fifth, dQᵀ = Kᵀ dSᵀ, has Hd), and a Hopper warp group's wgmma covers 64 rows of M: BLOCK_N must
    # be >= 16 · num_warps, or warp groups repeat each other's work. 64 keys with 8 warps did (issued /
    # useful tensor-core FLOPs 1.40, worst dot 2.00). sm_90a, packed, atomic dQ, MHA and GQA 64:8
    # (`benchmarks/attention.py --compile-only`; the ratio from the SASS's wgmma count):
    #   Hd 128, 128 keys × 32 queries, 8 warps, 3 stages: 255 registers, 0 spills, 129 KiB, 1.00
    #           (2 stages: 255 / 253 registers, 0 spills, 112 KiB, 1.00);
    #           64 keys, 4 warps, 3 stages (the alternative: two programs per SM): 253 / 254, 0, 97 KiB, 1.00;
    #           64 × 128 (64 queries) spills 276 B.
    #   Hd 64, 128 keys × 32 queries, 8 warps, 3 stages: 196 / 193 registers, 0 spills, 65 KiB, 1.00.
    # 128-key tiles also halve the atomic dQ traffic against 64-key ones (BLOCK_M · Hd fp32 adds per pair).
    # Timed on an H200 (benchmarks/gpu_check.sh, Triton 3.6, B 4 × T 4096, 32 heads, Hd 128, forward +
    # backward): 3 stages 5.54 ms, 2 stages 6.01 ms, 64 keys × 4 warps 5.61 ms, 16 × 64 6.70 ms,
    # 64 × 64 × 8 warps 7.99 ms (the duplicated work above), 32 × 64 × 8 warps 9.93 ms.
    # Before Hopper (sm_80, not timed) the third stage spills 364-380 B at 7B/13B (atomic path), two stages
    # 60-136 B, so the A100 keeps two. The consumer cards (sm_86, sm_89, sm_120: 99 KiB of shared memory a
    # block) cannot launch either (128 KiB): there 16 × 64 × 4 warps × 3 stages, sm_89: 254 registers, 0
    # spills, 72 KiB, ratio 1.00 (on the H200 it ran 6.70 ms against the pick's 5.51).
    if head_dim > 64:
        capability = _target_capability()
        if capability in _SMALL_SHARED_MEMORY:
            return _Blocks(16, 64, 4, 3)
        if capability < (9, 0):
            return _Blocks(32, 128, 8, 2)
    return _Blocks(32, 128, 8, 3)


def _bwd_dq_blocks(head_dim: int, dtype: torch.dtype) -> _Blocks:
    if _interpreting():
        return _Blocks(32, 16, 4, 1)
    if dtype == torch.float32:
        return _Blocks(32, 16, 4, 2)
    # The deterministic path's second pass: query rows resident (Q, dO, dQ), keys streamed; each key tile
    # costs three dots (Q Kᵀ, dO Vᵀ, dS K). sm_90a: Hd 64, 32-key tiles, 4 warps: 221 registers, 0 spills,
    # 56 KiB. Hd 128: 64 × 32 tiles, 4 warps, 3 stages: 154 registers, 0 spills, 80 KiB. Timed on an H200
    # (Triton 3.6, deterministic forward + backward ms at B 4 × T 4096 × 32 heads): 5.98 against
    # 6.22 for the 128 × 64 × 8 warps × 2 stages tile it replaced; 128 × 64 × 8 × 3 ran 5.77 but spills
    # (48 B on sm_90a at 70B's heads, packed). sm_80: 204 / 254 registers, 0 spills, 68 KiB.
    if head_dim <= 64:
        return _Blocks(128, 32, 4, 3)
    return _Blocks(64, 32, 4, 3)


def _check_blocks(blocks: _Blocks, bigger: int, smaller: int, kernel: str) -> None:
    # the three-range tile split needs the outer tile to be a whole number of inner tiles
    if bigger % smaller:
        raise ValueError(f"flash_attention {kernel}: tile sizes {blocks} need {bigger} to be a multiple of {smaller}")


def _mma_dtype(dtype: torch.dtype):
    """The dtype of tl.dot operands: the input's on GPU (fp32 accumulation); fp32 under the interpreter,
    whose bf16 arithmetic and bf16 dots are wrong in Triton 3.9."""
    if _interpreting():
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 dots, not TF32's 10-bit mantissa, so fp32 runs match a float64 reference
    return "ieee" if dtype == torch.float32 else "tf32"


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _POISON_OUTPUTS else out


def _head_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Any strides are passed to the kernels, but a tile row must be contiguous in the head dim. The model's
    # q/k/v are views of Linear outputs ([B, T, heads·Hd] viewed as [B, T, heads, Hd]), which already are.
    return x if x.stride(-1) == 1 else x.contiguous()


def _document_index(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the [start, end) of its document, as int32 [B, T] tensors, computed on the device.

    doc_start[b, t] = max{s <= t : s = 0 or position_ids[b, s] = 0}   (a running max)
    doc_end[b, t]   = min{s > t : position_ids[b, s] = 0}, or T        (a reversed running min)

    This is `document_bounds` per token, and the sync-free stand-in for cu_seqlens: reading document
    boundaries on the host would stall the GPU stream once per layer. Any integer position ids work; only
    their zeros matter.
    """
    B, T = position_ids.shape
    t = torch.arange(T, device=position_ids.device, dtype=torch.int32).expand(B, T)
    starts = position_ids == 0
    starts[:, 0] = True
    doc_start = torch.where(starts, t, 0).cummax(dim=1).values
    # next_start[b, t] = t + 1 if a document starts there, else T; its running min from the right is doc_end
    next_start = torch.full((B, T), T, dtype=torch.int32, device=position_ids.device)
    next_start[:, :-1] = torch.where(starts[:, 1:], t[:, 1:], T)
    doc_end = next_start.flip(1).cummin(dim=1).values.flip(1)
    return doc_start.contiguous(), doc_end.contiguous()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | None) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be [B, T, heads, Hd], got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"flash_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    B, T, H, Hd = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != Hd:
        raise ValueError(
            f"flash_attention: k/v must be [B={B}, T={T}, K, Hd={Hd}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    K = k.shape[2]
    if K == 0 or H % K:
        raise ValueError(f"flash_attention: query heads ({H}) must be a multiple of key/value heads ({K})")
    if Hd not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim must be one of {SUPPORTED_HEAD_DIMS}, got {Hd}")
    if B * H > _MAX_GRID_Y:  # batch × head is grid axis 1 in every kernel (tiles of a sequence on axis 0)
        raise ValueError(
            f"flash_attention: batch × query heads = {B} × {H} exceeds CUDA's grid y-limit "
            f"{_MAX_GRID_Y}; split the batch"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"flash_attention: dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if position_ids is not None:
        if position_ids.shape != (B, T):
            raise ValueError(f"flash_attention: position_ids must be [B={B}, T={T}], got {tuple(position_ids.shape)}")
        if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise TypeError(f"flash_attention: position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids.device != q.device:
            raise ValueError(f"flash_attention: position_ids on {position_ids.device}, q on {q.device}")
    if not HAS_TRITON:
        raise RuntimeError("flash_attention: Triton is not installed; use C2A_KERNELS=torch (attention_reference)")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"flash_attention: {q.device.type} tensors need TRITON_INTERPRET=1 (Triton's CPU interpreter) "
            "set before Triton is imported"
        )


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)  # batch, token, head; the head dim is contiguous


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, T, H, Hd] in q's dtype and lse [B, H, T] fp32 (log2 of each row's softmax normaliser, in units
    of the log2(e)/sqrt(Hd)-scaled scores). doc_start from `_document_index`, or None for one document per row."""
    q, k, v = (_head_dim_contiguous(x) for x in (q, k, v))
    B, T, H, Hd = q.shape
    K = k.shape[2]
    o = _empty((B, T, H, Hd), q.dtype, q.device)
    lse = _empty((B, H, T), torch.float32, q.device)
    sm_scale = 1.0 / math.sqrt(Hd)
    blocks = _fwd_blocks(Hd, q.dtype)
    _check_blocks(blocks, blocks.block_m, blocks.block_n, "forward")
    grid = (triton.cdiv(T, blocks.block_m), B * H)
    # fmt: off
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, q if doc_start is None else doc_start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        T, H, H // K, sm_scale * math.log2(math.e),
        HEAD_DIM=Hd, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, PACKED=doc_start is not None,
        MMA_DTYPE=_mma_dtype(q.dtype), DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, enable_fp_fusion=True,
    )
    # fmt: on
    return o, lse


def _backward_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta [B, H, T] fp32 = rowsum(dO ∘ O), the softmax backward's correction term."""
    B, T, H, Hd = o.shape
    delta = _empty((B, H, T), torch.float32, o.device)
    block = 64
    grid = (triton.cdiv(T, block), B * H)
    _attn_bwd_delta_kernel[grid](
        o, do, delta, *_strides(o), *_strides(do), T, H, HEAD_DIM=Hd, BLOCK_M=block, enable_fp_fusion=True
    )
    return delta


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq [B, T, H, Hd], dk and dv [B, T, K, Hd], in the inputs' dtype, from dO and the forward's o and lse.

    `deterministic` picks how dQ is finished (module docstring); None follows torch's deterministic mode.
    The atomic path saves recomputing Q Kᵀ and dO Vᵀ (5 matmuls of the causal T²·Hd/2 size instead of 7,
    -29% backward tensor FLOPs) for, per (key tile, query tile) pair, BLOCK_M·Hd fp32 atomic adds in L2:
    at T = 4096, Hd 128 and 128-key × 32-query tiles, about 2100 pairs × 16 KiB = 33 MiB per head, plus the
    zeroing (4 B per dQ element) and the cast (4 B read, 2 B written). FA2 and FA3 take the atomic route,
    the Triton tutorial the separate pass. On an H200 (Triton 3.6, bf16, 32 heads, Hd 128, T 4k-16k) the atomic
    path's forward + backward ran 1.08-1.14x the deterministic one's speed (benchmarks/RESULTS.md).
    """
    q, k, v, do = (_head_dim_contiguous(x) for x in (q, k, v, do))
    B, T, H, Hd = q.shape
    K = k.shape[2]
    group = H // K
    sm_scale = 1.0 / math.sqrt(Hd)
    qk_scale = sm_scale * math.log2(math.e)
    packed = doc_start is not None
    mma_dtype, dot_precision = _mma_dtype(q.dtype), _dot_precision(q.dtype)

    delta = _backward_delta(o, do)

    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # atomic path: dS K accumulates (unscaled) in an fp32 dQ that must start at zero, inside the dK/dV pass
    dq_acc = None if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    # one program per query head; under GQA each head's dK, dV go to fp32 [B, T, H, Hd] buffers, summed below
    dk = _empty(tuple(k.shape), k.dtype, k.device) if group == 1 else _empty((B, T, H, Hd), torch.float32, k.device)
    dv = _empty(tuple(v.shape), v.dtype, v.device) if group == 1 else _empty((B, T, H, Hd), torch.float32, v.device)
    blocks = _bwd_dkdv_blocks(Hd, q.dtype)
    _check_blocks(blocks, blocks.block_n, blocks.block_m, "backward dK/dV")
    # fmt: off
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, blocks.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, q if dq_acc is None else dq_acc,
        q if doc_end is None else doc_end, q if doc_start is None else doc_start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        *_strides(q if dq_acc is None else dq_acc),
        T, H, group, qk_scale, sm_scale,
        HEAD_DIM=Hd, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, PACKED=packed, ATOMIC_DQ=not deterministic,
        MMA_DTYPE=mma_dtype, DOT_PRECISION=dot_precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, enable_fp_fusion=True,
    )
    # fmt: on
    if group > 1:  # query head h belongs to K/V head h // group: heads [B, T, K, group, Hd] summed over the group
        dk = dk.view(B, T, K, group, Hd).sum(3).to(k.dtype)
        dv = dv.view(B, T, K, group, Hd).sum(3).to(v.dtype)

    dq = _empty(tuple(q.shape), q.dtype, q.device)
    if not deterministic:
        cast_block = 1024
        grid = (triton.cdiv(dq.numel(), cast_block),)
        _attn_bwd_dq_cast_kernel[grid](dq_acc, dq, dq.numel(), sm_scale, BLOCK=cast_block, enable_fp_fusion=True)
        return dq, dk, dv
    blocks = _bwd_dq_blocks(Hd, q.dtype)
    _check_blocks(blocks, blocks.block_m, blocks.block_n, "backward dQ")
    # fmt: off
    _attn_bwd_dq_kernel[(triton.cdiv(T, blocks.block_m), B * H)](
        q, k, v, do, lse, delta, dq, q if doc_start is None else doc_start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        T, H, group, qk_scale, sm_scale,
        HEAD_DIM=Hd, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, PACKED=packed,
        MMA_DTYPE=mma_dtype, DOT_PRECISION=dot_precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, enable_fp_fusion=True,
    )
    # fmt: on
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# autograd.Function and the public function.
# ---------------------------------------------------------------------------------------------------------


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, o and the fp32 lse [B, H, T]; the backward recomputes P tile by tile from them."""

    @staticmethod
    def forward(ctx, q, k, v, doc_start, doc_end):  # type: ignore[override]
        o, lse = attention_forward(q, k, v, doc_start)
        ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, doc_start, doc_end)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | Documents | None = None
) -> torch.Tensor:
    """Causal grouped-query attention over packed documents; same contract as `attention_reference`.

    q [B, T, H, Hd], k and v [B, T, K, Hd] (H a multiple of K, Hd in 16/32/64/128), position_ids [B, T]
    integer (or a `Documents` built from them and shared across layers) or None -> [B, T, H, Hd] in q's
    dtype. Differentiable in q, k, v. Never syncs with the host.
    """
    documents = Documents.of(position_ids)
    _check_inputs(q, k, v, documents.position_ids)
    if q.numel() == 0:
        return q.clone()  # nothing to attend; keeps the graph to q
    doc_start, doc_end = documents.index()
    return FlashAttentionFunction.apply(q, k, v, doc_start, doc_end)
