"""Run by torchrun from test_step_cuts.py: the same optimizer steps with each of the step's cuts on and off.

    torchrun --nproc_per_node=R tests/step_cuts_dist.py OUT.json DTYPE

For every variant (train.gather_once, train.reduce_once: off/off, on/off, off/on, on/on; the first two blocks
activation-checkpointed; both on with train.replicas = ranks, every rank a whole copy) and accumulation
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
# each variant's train settings; ac_first: the first 2 of the demo model's 4 blocks checkpointed, what
# train.activation_checkpointing = "auto" resolves to when the planner asks for 2
VARIANTS = {
    "default": {},
    "gather_once": {"train.gather_once": "true"},
    "reduce_once": {"train.reduce_once": "true"},
    "both": {"train.gather_once": "true", "train.reduce_once": "true"},
    "ac_first": {"train.activation_checkpointing": "first", "train.ac_blocks": "2"},
    # HSDP with as many replicas as ranks: a shard group of one, every rank a whole copy, no FSDP
    "replicated": {"train.replicas": "WORLD", "train.gather_once": "true", "train.reduce_once": "true"},
}


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


def run(d, dtype: str, settings: dict[str, str], accum: int) -> dict:
    settings = {k: str(d.world_size) if v == "WORLD" else v for k, v in settings.items()}
    cfg = build_config({}, {"train.dtype": dtype, **settings})
    d = init_distributed(cfg.train.replicas)  # the same process group; the mesh of this variant
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
        # a checkpointed block's forward is replaced by a function (c2a.train.parallel), no longer its method
        "checkpointed": sum(getattr(b.forward, "__self__", None) is not b for b in model.layers),
        "collectives": collectives,  # of the last step, by op
    }


def main(out: str, dtype: str) -> None:
    d = init_distributed()
    results = {}
    for name, settings in VARIANTS.items():
        for accum in (1, 3) if name != "ac_first" else (3,):  # checkpointing does not meet accumulation
            results[f"{name}/accum{accum}"] = run(d, dtype, settings, accum)
    if d.rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    shutdown_and_exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
