"""Causal grouped-query attention over packed documents.

softmax(q·kᵀ / sqrt(Hd) + mask) · v, where query t of a row attends to keys s ≤ t of the same document.
A document starts at t = 0 and wherever `position_ids` restarts at 0; `position_ids=None` means one
document per row. Each of the K key/value heads serves H/K consecutive query heads (Llama-2 70B: 64/8).

Torch reference first (scaled_dot_product_attention per document: no [T, T] mask is built, and no FLOPs
are spent across documents); the Triton kernel follows (attention issue).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """q [B, T, H, Hd], k and v [B, T, K, Hd], position_ids [B, T] or None -> [B, T, H, Hd]."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, T, Hd]
    gqa = q.shape[1] != k.shape[1]
    if position_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)
    bounds = document_bounds(position_ids)
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
