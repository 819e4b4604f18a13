"""Run by torchrun from test_train.py: one optimizer step's loss and full gradients for a given split.

    torchrun --nproc_per_node=R tests/dist_step.py OUT.pt MICRO_BATCH MODE AC [REPLICAS]

Builds the trainer's model and data exactly as `c2a.train` does (demo task, seeded init), takes the
first optimizer step of a fixed global batch of 4 rows, and writes (loss, targets, every gradient in
full) from rank 0. The rows of the step do not depend on the split, so any R x accumulation must agree.
AC is none, full or selective (with ac_every=2: blocks 0 and 2 of the demo model's 4). Also written: how
many times each block's attention ran (a checkpointed block runs it again in the backward), and rank 0's
loss from the model `gather_model` copies out of the shards next to the sharded model's on the same rows.
"""

from __future__ import annotations

import sys

import torch
from torch.distributed.tensor import DTensor

from c2a.config import LlamaConfig, build_config
from c2a.data.batching import MicroBatchLoader
from c2a.train.export import gather_model
from c2a.train.parallel import build_sharded_model, init_distributed, materialize, shutdown_and_exit
from c2a.train.run_data import build_data
from c2a.train.step import forward_backward

GLOBAL_ROWS = 4


def main(out: str, micro_batch: int, mode: str, ac: str, replicas: int) -> None:
    cfg = build_config(
        {},
        {
            "data.demo_train_size": "200",
            "data.demo_heldout_size": "8",
            "data.max_len": "64",
            "train.activation_checkpointing": ac,
            "train.ac_every": "2" if ac == "selective" else "1",
        },
    )
    d = init_distributed(replicas)
    data = build_data(cfg, d)
    loader = MicroBatchLoader(
        data.train,
        seq_len=64,
        micro_batch_size=micro_batch,
        global_batch_rows=GLOBAL_ROWS,
        mode=mode,
        rank=d.rank,
        world_size=d.world_size,
        seed=0,
    )
    model = build_sharded_model(LlamaConfig.from_name("demo"), cfg.train, d)
    materialize(model, None, seed=0)
    it = iter(loader)
    batches = [next(it) for _ in range(loader.accum_steps)]
    with torch.no_grad():  # every rank runs the same number of forwards: FSDP's all-gathers pair up
        sharded_sum = sum(
            model.loss(b.input_ids, b.labels, position_ids=b.position_ids, normalizer=1.0) for b in batches
        )
    copy = gather_model(
        model, model.cfg, torch.float32, torch.device("cpu")
    )  # collective; the unsharded copy lives on rank 0
    attention_calls = [0] * len(model.layers)
    for i, layer in enumerate(model.layers):
        layer.attention.register_forward_pre_hook(
            lambda *_, i=i: attention_calls.__setitem__(i, attention_calls[i] + 1)
        )
    loss, targets = forward_backward(model, batches, device=d.device)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
    if d.rank == 0:
        with torch.no_grad():
            copy_sum = sum(
                copy.loss(b.input_ids, b.labels, position_ids=b.position_ids, normalizer=1.0) for b in batches
            )
        torch.save(
            {
                "loss": loss,
                "targets": targets,
                "grads": grads,
                "accum": loader.accum_steps,
                "attention_calls": attention_calls,
                "sharded_loss_sum": sharded_sum,
                "gathered_loss_sum": copy_sum,
            },
            out,
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    shutdown_and_exit(0)
