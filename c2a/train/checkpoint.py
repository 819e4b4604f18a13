"""Sharded, crash-safe training checkpoints with torch.distributed.checkpoint (DCP).

Layout: out_dir/checkpoints/step_00000100/ holds DCP's shard files and .metadata (model and optimizer,
each rank writing its own shards), trainer_state.json (step, scheduler, data position, counters) and
rng_rank{r}.pt. A checkpoint is written to step_XXXXXXXX.tmp/ and renamed once every rank has finished,
so a crash mid-save leaves the previous checkpoint as the latest complete one. DCP reshards on load, so a
run can resume on a different number of ranks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step_(\d{8})")
STATE_FILE = "trainer_state.json"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Only renamed directories count; `.tmp` ones are partial."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file() and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it with the same step. Returns the complete checkpoint's path."""
    rank = dist.get_rank()
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        state_file = tmp / STATE_FILE
        with open(state_file, "w") as f:
            json.dump({**trainer_state, "step": step, "world_size": dist.get_world_size()}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_checkpoints(out_dir: str | Path) -> None:
    """Rank 0, at start: drops `.tmp` directories a crashed save left behind."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        for p in root.glob("step_*.tmp"):
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The step, scheduler, data position and counters of a complete checkpoint (no tensors)."""
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: loads model and optimizer shards (resharding to this world size) and returns the
    trainer state. RNG states are restored when the world size matches the one that saved them."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    trainer_state = read_trainer_state(path)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if trainer_state["world_size"] == dist.get_world_size() and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state
