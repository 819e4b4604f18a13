"""One optimizer step on every rank.

A step is: this rank's micro-batches for the step, the global count of trained targets (all-reduced),
forward/backward of each micro-batch with the loss divided by that global count (so loss and gradients do
not depend on how the global batch is split over ranks and accumulation), clipping on the global norm, then
the optimizer step unless the loss or gradient is non-finite. With train.loss_weighting = "example" each
target is weighed by 1 / its example's trained targets and the divisor is the global count of examples
instead (c2a.train.weighting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from c2a.config import TrainSection
from c2a.data.batching import MicroBatch
from c2a.model.llama import Llama
from c2a.train.compute_copies import held, masters_stepped
from c2a.train.lifecycle import StopControl
from c2a.train.weighting import step_weights


@dataclass
class StepResult:
    loss: torch.Tensor  # global mean loss of the step (0-dim, on device)
    grad_norm: torch.Tensor
    targets: torch.Tensor  # global count of trained targets
    tokens: int  # this rank's non-padding tokens
    positions: int  # this rank's positions (padding included)
    attn_sq: int  # this rank's sum over documents of length^2 (for the attention FLOP count)
    finite: bool
    stop: bool = False  # some rank was asked to stop (SIGTERM/SIGINT): every rank stops after this step
    save_due: bool = False  # a timed checkpoint is due (rank 0's clock)


@dataclass(frozen=True)
class StepWork:
    """What FSDP2 does once per optimizer step instead of once per micro-batch (train.gather_once,
    train.reduce_once; c2a.train.parallel builds the blocks to match)."""

    gather_once: bool = False  # keep the parameters unsharded until the step's last backward
    reduce_once: bool = False  # accumulate unsharded fp32 gradients; reduce-scatter in the last backward

    @classmethod
    def of(cls, train: TrainSection) -> StepWork:
        return cls(train.gather_once, train.reduce_once)

    def before_micro_batch(self, model: torch.nn.Module, last: bool) -> None:
        if not isinstance(model, FSDPModule):
            return
        if self.gather_once:
            model.set_reshard_after_backward(last)  # recurses into every FSDP unit
        if self.reduce_once:
            model.set_requires_gradient_sync(last)


def forward_backward(
    model: Llama,
    batches: list[MicroBatch],
    device: torch.device,
    flags: torch.Tensor | None = None,
    weighting: str = "token",
    work: StepWork = StepWork(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulates the gradients of one optimizer step's micro-batches on this rank. Returns (the global
    mean loss, the global count of trained targets), both already all-reduced, as 0-dim device tensors.
    `flags` (a small int64 tensor, e.g. StopControl's) is summed over ranks in place by the same
    all-reduce as the loss, at the end of the step, so agreeing on it costs no extra collective."""
    batches = [b.to(device, non_blocking=True) for b in batches]
    targets = sum((b.labels != -100).sum() for b in batches)
    weights, examples = step_weights(batches, weighting)
    if examples is None:
        dist.all_reduce(targets)  # the global count of trained targets: every rank divides by it
        normalizer = targets.clamp(min=1).float()
    else:
        counts = torch.stack([targets, examples.to(targets.dtype)])
        dist.all_reduce(counts)  # the global counts of targets and of examples: every rank divides by the latter
        targets, normalizer = counts[0], counts[1].clamp(min=1).float()
    loss_sum = torch.zeros((), device=device)
    with held(model):  # in a group of one without FSDP: the compute copies, cast once for the whole step
        for i, (b, w) in enumerate(zip(batches, weights)):
            work.before_micro_batch(model, last=i == len(batches) - 1)
            loss = model.loss(
                b.input_ids,
                b.labels,
                position_ids=b.position_ids,
                normalizer=normalizer,
                num_trained=b.num_trained,
                weights=w,
            )
            loss.backward()
            loss_sum += loss.detach()
    _sum_replicated_gradients(model)
    if flags is None:
        dist.all_reduce(loss_sum)
        return loss_sum, targets
    reduced = torch.cat([loss_sum.view(1), flags.to(device, loss_sum.dtype)])
    dist.all_reduce(reduced)
    flags.copy_(reduced[1:])
    return reduced[0], targets


def _sum_replicated_gradients(model: torch.nn.Module) -> None:
    """Without FSDP on several ranks (a shard group of one: train.replicas = ranks with gather_once), every
    rank holds the whole model: the step's fp32 gradients are summed over the ranks here, once, in place (FSDP's
    reduce-scatter sums too: the loss is already divided by the global count of targets). A parameter
    without a gradient on this rank joins with zeros, so that every rank makes the same collectives."""
    if isinstance(model, FSDPModule) or dist.get_world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for p in params:
        dist.all_reduce(p.grad)


def train_step(
    model: Llama,
    optimizer: torch.optim.Optimizer,
    batches: list[MicroBatch],
    grad_clip: float,
    device: torch.device,
    control: StopControl | None = None,
    weighting: str = "token",
    work: StepWork = StepWork(),
) -> StepResult:
    flags = control.local_flags(device) if control is not None else torch.zeros(2, device=device)
    loss, targets = forward_backward(model, batches, device, flags, weighting, work)
    params = [p for p in model.parameters() if p.grad is not None]
    # clip_grad_norm_ reduces the norm over every shard (DTensor) of every rank: the global norm
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    # the one host sync of a step: a non-finite loss or gradient must skip the update, and a step without
    # any trained target has nothing to learn from (Adam's momentum alone would still move the weights)
    # (the stop / timed-save flags ride along: they were summed over ranks with the loss)
    finite, has_targets, stop, save_due = torch.cat(
        [torch.stack([torch.isfinite(loss) & torch.isfinite(grad_norm), targets > 0]), flags > 0]
    ).tolist()
    if finite and has_targets:
        optimizer.step()
        masters_stepped(model)
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b.num_tokens for b in batches)
    positions = sum(b.input_ids.numel() for b in batches)
    attn_sq = sum(b.sum_len_sq for b in batches)
    return StepResult(loss, grad_norm, targets, tokens, positions, attn_sq, finite, stop, save_due)
