"""How a step's targets are weighed in its loss: train.loss_weighting.

- "token" (c2a's default): every trained target weighs the same; the step's loss is the sum of the
  targets' cross-entropies divided by the step's trained targets, all ranks and micro-batches together.
- "example" (the released claude2-alpaca model's training: micro-batches of one example, each example's
  mean loss divided by the accumulation steps and averaged over ranks): each example's mean over its own
  trained targets, then the mean over the step's examples. A long answer then weighs as much as a short one.
  As a weighted sum: target t of example e weighs w_t = 1 / (e's trained targets), and the sum is divided by
  the step's examples (the ones with a trained target) over every rank and micro-batch, so the result does
  not depend on how the step is split.

An example is a document: where position_ids restart at 0 (packed rows), or a whole row (padded rows, whose
position_ids run 0..T-1 and whose padding has no trained target). Everything here runs on the batch's
device without a host sync.
"""

from __future__ import annotations

import torch

from c2a.data.batching import MicroBatch

LOSS_WEIGHTINGS = ("token", "example")


def example_weights(labels: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels, position_ids [B, T] -> (weights [B, T] fp32: 1 / the trained targets of the token's example
    on trained targets, 0 elsewhere; the number of examples with a trained target, a 0-dim int64 tensor)."""
    B, T = labels.shape
    trained = labels != -100  # [B, T]
    # a document id unique over the whole batch: row b's documents are b·(T+1) + 1, 2, ... (T+1 per row
    # leaves room for a row of T one-token documents)
    doc = torch.cumsum(position_ids == 0, dim=1) + torch.arange(B, device=labels.device)[:, None] * (T + 1)  # [B, T]
    counts = torch.zeros(B * (T + 1), dtype=torch.float32, device=labels.device)
    counts.index_add_(0, doc.flatten(), trained.flatten().float())  # trained targets per document
    per_token = counts[doc]  # [B, T]
    weights = torch.where(trained, 1.0 / per_token.clamp(min=1), torch.zeros((), device=labels.device))
    return weights, (counts > 0).sum()


def step_weights(batches: list[MicroBatch], weighting: str) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """Per-micro-batch weights (None for "token") and this rank's count of examples (None for "token")."""
    if weighting == "token":
        return [None] * len(batches), None
    if weighting != "example":
        raise ValueError(f"train.loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {weighting!r}")
    pairs = [example_weights(b.labels, b.position_ids) for b in batches]
    return [w for w, _ in pairs], sum(n for _, n in pairs)
