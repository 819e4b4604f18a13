"""Run by test_as_released.py, once per world size: the first optimizer step under
train.loss_weighting = "example", for packed and padded rows and two micro-batch sizes.

    torchrun --nproc_per_node=R tests/dist_weighting.py OUT.pt

Writes from rank 0 {(mode, micro_batch): {"loss", "targets", "grads"}}. The model is the tiny MODEL,
initialised as the trainer does (materialize, seed 0), so the test can rebuild it unsharded; the data is
DATASET (examples of 3 to 40 positions, so per-token and per-example means differ).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from c2a.config import LlamaConfig, build_config
from c2a.data.batching import MicroBatchLoader
from c2a.train.parallel import build_sharded_model, init_distributed, materialize, shutdown_and_exit
from c2a.train.step import forward_backward

MODEL = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16, max_seq_len=64)
GLOBAL_ROWS, SEQ_LEN = 4, 64


class Examples:
    """(input_ids, labels) pairs with a prompt of 1-10 untrained positions and 2-30 trained ones."""

    def __init__(self, n: int = 40, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            p, r = int(rng.integers(1, 11)), int(rng.integers(2, 31))
            ids = rng.integers(3, MODEL.vocab_size, p + r + 1)
            labels = ids[1:].copy()
            labels[: p - 1] = -100
            self.items.append((ids[:-1], labels))
        self.lengths = np.array([len(x) for x, _ in self.items])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.items[i]


def loader(mode: str, micro_batch: int, rank: int, world_size: int) -> MicroBatchLoader:
    return MicroBatchLoader(
        Examples(),
        mode=mode,
        seq_len=SEQ_LEN,
        micro_batch_size=micro_batch,
        global_batch_rows=GLOBAL_ROWS,
        rank=rank,
        world_size=world_size,
        seed=0,
    )


def main(out: str) -> None:
    d = init_distributed()
    train = build_config({}).train
    results = {}
    for mode in ("packed", "padded"):
        for micro in (1, 2):
            model = build_sharded_model(MODEL, train, d)
            materialize(model, None, seed=0)
            ld = loader(mode, micro, d.rank, d.world_size)
            it = iter(ld)
            batches = [next(it) for _ in range(ld.accum_steps)]
            loss, targets = forward_backward(model, batches, d.device, weighting="example")
            grads = {
                n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                for n, p in model.named_parameters()
            }
            results[(mode, micro)] = {"loss": loss, "targets": targets, "grads": grads}
    if d.rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
    shutdown_and_exit(0)
