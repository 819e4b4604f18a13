"""The run's "auto" settings made concrete before the model is built: train.micro_batch_auto and
train.activation_checkpointing = "auto", chosen by the planner (c2a.plan.auto) for this rank's device."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist

from c2a.config import LlamaConfig, TrainConfig
from c2a.data.batching import ExampleDataset
from c2a.plan import run_workload
from c2a.plan.auto import resolve_auto
from c2a.plan.workload import RESERVED_GIB, GiB
from c2a.train.parallel import Dist

log = logging.getLogger("c2a")


def usable_device_bytes(d: Dist) -> float | None:
    """Collective on CUDA: the smallest device memory of the group less RESERVED_GIB, so every rank makes the
    same choice; None off CUDA (nothing to plan for)."""
    if d.device.type != "cuda":
        return None
    total = torch.tensor([torch.cuda.get_device_properties(d.device).total_memory], device=d.device)
    dist.all_reduce(total, op=dist.ReduceOp.MIN)
    return float(total.item()) - RESERVED_GIB * GiB


def resolve_run_settings(
    cfg: TrainConfig,
    model: LlamaConfig,
    d: Dist,
    dataset: ExampleDataset,
    rows: int,
    saved: dict[str, Any] | None,
    usable_bytes: float | None = None,
) -> TrainConfig:
    """`cfg` with its "auto" train settings resolved for a step of `rows` rows; `cfg` itself when it has none.
    A checkpoint (`saved`, its trainer state) written by as many ranks gives the micro-batch it recorded.
    `usable_bytes`: the device memory to plan for (default: this group's, `usable_device_bytes`)."""
    t = cfg.train
    if not t.micro_batch_auto and t.activation_checkpointing != "auto":
        return cfg
    if usable_bytes is None:
        usable_bytes = usable_device_bytes(d)
    recorded = None
    if saved is not None and t.micro_batch_auto and saved["data"]["world_size"] == d.world_size:
        recorded = int(saved["data"]["micro_batch_size"])
    w = run_workload(cfg, model, d.world_size, d.device, dataset, rows // (t.micro_batch * d.world_size))
    train, notes = resolve_auto(t, w, rows, usable_bytes, recorded)
    for line in notes:
        log.info("%s", line)
    return dataclasses.replace(cfg, train=train)
