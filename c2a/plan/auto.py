"""The settings the planner chooses: train.micro_batch_auto and train.activation_checkpointing = "auto".

Both trade memory for speed and never change what is trained:
  - the micro-batch: the largest that fits among the sizes m that split the step's R rows evenly over the S
    ranks (R / S a multiple of m), so the step's rows, the global batch, the step count and the schedule
    stay what train.micro_batch gives them; only the number of forwards changes (accumulation R / (S m)).
    A larger micro-batch amortises what each micro-batch costs outside its matmuls (kernel launches, FSDP's
    per-micro-batch work, the host's Python).
  - activation checkpointing: the fewest blocks, counted from the first, whose recomputation makes the run
    fit ("first" with ac_blocks = k; none for k = 0, full for every block). The first blocks are the ones to
    recompute: the backward reaches them last, when the later blocks' saved tensors are already freed, so
    their recomputation adds the least to the peak. Recomputing a block costs a third of its FLOPs again.
Checkpointing is chosen first, at the configured micro-batch; the micro-batch then as large as fits with
it, so choosing the micro-batch never adds recomputation. "Fits" is the planner's per-rank peak
(c2a.plan.memory) within the device's memory less RESERVED_GIB. Deterministic: the same model, data, ranks
and memory give the same choice. Without a device to plan for (CPU), the configured micro-batch and no
checkpointing.
"""

from __future__ import annotations

import dataclasses

from c2a.config import LlamaConfig, TrainConfig, TrainSection
from c2a.plan.memory import Workload, plan_memory
from c2a.plan.workload import RESERVED_GIB, DataShape, GiB, Machine, accumulation, workload


def fits(w: Workload, usable_bytes: float) -> bool:
    return plan_memory(w).peak <= usable_bytes


def fewest_checkpointed_blocks(w: Workload, usable_bytes: float) -> int | None:
    """The fewest first blocks to checkpoint for `w` to fit; None when checkpointing every block is not enough."""
    for k in range(w.model.n_layers + 1):
        if fits(dataclasses.replace(w, activation_checkpointing="first", ac_blocks=k), usable_bytes):
            return k
    return None


def micro_batch_sizes(rows: int, ranks: int) -> list[int]:
    """The micro-batches that leave a step of `rows` rows on `ranks` ranks as it is, largest first: the
    divisors of the rows per rank."""
    if rows % ranks:
        raise ValueError(f"a step of {rows} rows does not split over {ranks} ranks")
    per_rank = rows // ranks
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def largest_micro_batch(w: Workload, rows: int, usable_bytes: float) -> int | None:
    """The largest of `micro_batch_sizes` for which `w` (with its accumulation to match) fits; None if none does."""
    for m in micro_batch_sizes(rows, w.ranks):
        if fits(dataclasses.replace(w, micro_batch=m, accumulation=rows // (m * w.ranks)), usable_bytes):
            return m
    return None


def resolve_auto(
    train: TrainSection, w: Workload, rows: int, usable_bytes: float | None, recorded_micro_batch: int | None = None
) -> tuple[TrainSection, list[str]]:
    """`train` with its "auto" settings made concrete, and a line on each choice.

    `w` is the configured run's workload (train.micro_batch, its accumulation); `rows` the step's rows;
    `usable_bytes` a rank's device memory the planner may fill (None: no device to plan for, e.g. CPU);
    `recorded_micro_batch` the micro-batch a checkpoint being resumed ran with (on as many ranks), which a
    resumed run keeps."""
    notes: list[str] = []
    ac, k, n = train.activation_checkpointing, train.ac_blocks, w.model.n_layers
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    if ac == "auto":
        if usable_bytes is None:
            ac, k = "none", 0
            notes.append("train.activation_checkpointing = auto: none (no CUDA device to plan for)")
        else:
            at = dataclasses.replace(w, activation_checkpointing="first", ac_blocks=0)
            chosen = fewest_checkpointed_blocks(at, usable_bytes)
            if chosen is None:
                k = n
                full = plan_memory(dataclasses.replace(at, ac_blocks=n)).peak
                notes.append(
                    f"train.activation_checkpointing = auto: every block, and still the planner's peak {gib(full)} "
                    f"exceeds the {gib(usable_bytes)} usable at micro-batch {w.micro_batch}"
                )
            else:
                k = chosen
                notes.append(f"train.activation_checkpointing = auto: {k} of {n} blocks (fewest that fit)")
            ac = "none" if k == 0 else "full" if k == n else "first"
    mb = train.micro_batch
    if train.micro_batch_auto:
        if recorded_micro_batch is not None:
            mb = recorded_micro_batch
            notes.append(f"train.micro_batch_auto: {mb}, as the checkpoint resumed from recorded")
        elif usable_bytes is None:
            notes.append(f"train.micro_batch_auto: {mb} (train.micro_batch; no CUDA device to plan for)")
        else:
            chosen = largest_micro_batch(
                dataclasses.replace(w, activation_checkpointing=ac, ac_blocks=k), rows, usable_bytes
            )
            mb = chosen or mb
            notes.append(
                f"train.micro_batch_auto: {mb} of {micro_batch_sizes(rows, w.ranks)} (largest that fits)"
                if chosen
                else f"train.micro_batch_auto: none fits in {gib(usable_bytes)}; keeping train.micro_batch = {mb}"
            )
    return dataclasses.replace(train, micro_batch=mb, activation_checkpointing=ac, ac_blocks=k), notes


def resolve_for_machine(
    cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine
) -> tuple[TrainConfig, dict[str, int], list[str]]:
    """`cfg` with its "auto" settings as the trainer would resolve them on `machine` (python -m c2a.plan), the
    Workload fields that keep the configured step's rows ({"accumulation": ...}, or {}), and a line on each."""
    t = cfg.train
    if not t.micro_batch_auto and t.activation_checkpointing != "auto":
        return cfg, {}, []
    accum = accumulation(cfg, data, machine.gpus, t.micro_batch)
    rows = accum * t.micro_batch * machine.gpus
    w = workload(cfg, model, data, machine, accumulation=accum)
    train, notes = resolve_auto(t, w, rows, (machine.memory_gib - RESERVED_GIB) * GiB)
    return dataclasses.replace(cfg, train=train), {"accumulation": rows // (train.micro_batch * machine.gpus)}, notes
