"""Run by torchrun from test_step_cuts.py: the same optimizer steps with each of the step's cuts on and off.

    torchrun --nproc_per_node=R tests/step_cuts_dist.py OUT.json DTYPE

For every variant (train.gather_once, train.reduce_once: off/off, on/off, off/on, on/on) and accumulation
(1 and 3 micro-batches per rank), a fresh demo-shaped model (seeded init) takes STEPS optimizer steps on the
same global rows: GLOBAL_ROWS rows of 64 positions a step, drawn from a generator seeded by the step and
split over the ranks and micro-batches. Rank 0 writes each run's per-step losses and gradient norms, a
checksum of the final parameters, and the collectives of its last step (counted by the step report), as JSON.
"""

from __future__ import annotations

import json
import sys

import torch
from torch.distributed.tensor import DTensor

from c2a.config import LlamaConfig, build_config
from c2a.data.batching import MicroBatch
from c2a.train.optim import build_optimizer
from c2a.train.parallel import build_sharded_model, init_distributed, materialize, shutdown_and_exit
from c2a.train.step import StepWork, train_step
from c2a.train.step_report import report_step

GLOBAL_ROWS, SEQ, STEPS = 6, 64, 3
VARIANTS = {"default": (False, False), "gather_once": (True, False), "reduce_once": (False, True), "both": (True, True)}


def rows_of_step(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, vocab, (GLOBAL_ROWS, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    cut = torch.randint(8, SEQ - 8, (GLOBAL_ROWS,), generator=g)  # a prompt of `cut` positions, then trained
    for r in range(GLOBAL_ROWS):
        labels[r, cut[r] : -1] = ids[r, cut[r] + 1 :]
    return ids, labels


def micro_batches(step: int, vocab: int, rank: int, world: int, accum: int) -> list[MicroBatch]:
    ids, labels = rows_of_step(step, vocab)
    mine = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    ids, labels = ids[mine], labels[mine]
    out = []
    for x, y in zip(ids.chunk(accum), labels.chunk(accum)):
        pos = torch.arange(SEQ).expand(x.shape[0], SEQ).clone()
        out.append(MicroBatch(x, y, pos, x.shape[0], x.numel(), x.shape[0] * SEQ * SEQ, int((y != -100).sum())))
    return out


def run(d, dtype: str, gather_once: bool, reduce_once: bool, accum: int) -> dict:
    cfg = build_config(
        {},
        {
            "train.dtype": dtype,
            "train.gather_once": str(gather_once).lower(),
            "train.reduce_once": str(reduce_once).lower(),
        },
    )
    model_cfg = LlamaConfig.from_name("demo")
    model = build_sharded_model(model_cfg, cfg.train, d)
    materialize(model, None, seed=0)
    optimizer = build_optimizer(model, cfg, d.device)
    model.train()
    losses, norms = [], []
    for step in range(STEPS):
        batches = micro_batches(step, model_cfg.vocab_size, d.rank, d.world_size, accum)
        report, result = report_step(
            lambda: train_step(model, optimizer, batches, 1.0, d.device, work=StepWork.of(cfg.train)),
            optimizer,
            model_cfg.num_params,
        )
        losses.append(float(result.loss))
        norms.append(float(result.grad_norm))
    checksum = 0.0
    for p in model.parameters():
        full = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        checksum += float(full.double().abs().sum())
    collectives = {op.split("::")[-1]: n for op, n in report.by_op.items() if op.startswith("c10d::")}
    return {
        "losses": losses,
        "grad_norms": norms,
        "checksum": checksum,
        "fsdp": hasattr(model, "reshard"),
        "collectives": collectives,  # of the last step, by op
    }


def main(out: str, dtype: str) -> None:
    d = init_distributed()
    results = {}
    for name, (gather, reduce) in VARIANTS.items():
        for accum in (1, 3):
            results[f"{name}/accum{accum}"] = run(d, dtype, gather, reduce, accum)
    if d.rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    shutdown_and_exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
