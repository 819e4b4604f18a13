"""Helpers for the tests that run the real trainer (`python -m c2a.train` / torchrun, gloo on CPU) and then
check what it wrote: metrics.jsonl, DCP checkpoints read back offline, and the loss of a model on the
exact rows of an optimizer step (rebuilt with the trainer's own loader settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from c2a.data.batching import MicroBatch, MicroBatchLoader
from c2a.model import Llama

ROOT = Path(__file__).resolve().parents[1]
# A small run: the demo model on a few hundred demo examples, one 64-token row per micro-batch.
TINY = [
    "--data.demo_train_size=256",
    "--data.demo_heldout_size=16",
    "--data.max_len=64",
    "--train.micro_batch=1",
    "--train.global_batch=16",
    "--eval.demo_accuracy=false",
    "--train.progress=false",
    "--train.log_every=1",
]


def train_cmd(nproc: int, out: Path, *args: str, tiny: bool = True) -> list[str]:
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    return [*launch, "-m", "c2a.train", f"--out_dir={out}", *(TINY if tiny else []), *args]


def run_train(
    nproc: int,
    out: Path,
    *args: str,
    timeout: float = 300,
    tiny: bool = True,
    expect: int = 0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        train_cmd(nproc, out, *args, tiny=tiny), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def checkpoint_tensors(checkpoint: Path, tmp: Path) -> dict[str, dict]:
    """A DCP checkpoint read back without a process group: {"model": {name: tensor}, "optim": {...}}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, flat)
    return torch.load(flat, weights_only=False)


def step_rows(dataset, step: int, global_rows: int, *, mode: str, seq_len: int, seed: int = 0) -> list[MicroBatch]:
    """The rows of optimizer step `step` (1-based), one per micro-batch: the loader's row order depends only
    on (dataset, seed, epoch, mode, seq_len, rows per step), not on ranks or accumulation, so a single
    process with one row per micro-batch sees the same rows as the run's ranks did."""
    loader = MicroBatchLoader(
        dataset, seq_len=seq_len, micro_batch_size=1, global_batch_rows=global_rows, mode=mode, seed=seed
    )
    skip, rows = (step - 1) * global_rows, []
    while len(rows) < global_rows:
        for mb in loader:  # the rest of an epoch, then the next one
            if skip:
                skip -= 1
            elif len(rows) < global_rows:
                rows.append(mb)
    return rows


@torch.no_grad()
def loss_on_rows(model: Llama, rows: list[MicroBatch]) -> float:
    """The mean cross-entropy over every trained target of `rows`, as the trainer normalises a step."""
    total = sum(model.loss(b.input_ids, b.labels, position_ids=b.position_ids, normalizer=1.0).double() for b in rows)
    targets = sum(int((b.labels != -100).sum()) for b in rows)
    return float(total) / targets
