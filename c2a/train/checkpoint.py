"""Sharded, crash-safe training checkpoints with torch.distributed.checkpoint (DCP).

Layout: out_dir/checkpoints/step_00000100/ holds DCP's shard files and .metadata (model and optimizer,
each rank writing its own shards), trainer_state.json (step, scheduler, data position, counters) and
rng_rank{r}.pt. A checkpoint is written to step_XXXXXXXX.tmp/ and renamed once every rank has finished,
so a crash mid-save leaves the previous checkpoint as the latest complete one. DCP reshards on load, so a
run can resume on a different number of ranks.
"""

from __future__ import annotations

import errno
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from c2a.errors import UserError

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
    found = [
        p
        for p in root.iterdir()
        if _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file() and (p / ".metadata").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def best_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint whose trainer state records the lowest validation loss (train.keep_best)."""
    scored = []
    for path in complete_checkpoints(out_dir):
        try:
            val_loss = read_trainer_state(path).get("val_loss")
        except (OSError, ValueError):  # an unreadable state: validate_checkpoint reports it on resume
            continue
        if val_loss is not None:
            scored.append((val_loss, path))
    return min(scored)[1] if scored else None


def stale_checkpoints(out_dir: str | Path, keep_last: int, keep_best: bool = False) -> list[Path]:
    """What pruning removes: every complete checkpoint but the newest `keep_last` and, with keep_best, the best."""
    best = best_checkpoint(out_dir) if keep_best else None
    return [p for p in complete_checkpoints(out_dir)[:-keep_last] if p != best]


class CheckpointUnusable(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong with it."""


def validate_checkpoint(path: Path) -> dict[str, Any]:
    """Checks a complete checkpoint without loading tensors and returns its trainer state: the state file
    parses and holds what a resume reads, DCP's .metadata reads, and every shard file it points into exists
    and is as long as the metadata says (a shard cut short by a full disk or a copy that died). Raises
    CheckpointUnusable naming the file."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointUnusable(f"{state_file}: unreadable ({e})") from None
    missing = [
        k
        for k in ("step", "world_size", "scheduler", "data", "counters")
        if not isinstance(state, dict) or k not in state
    ]
    if missing:
        raise CheckpointUnusable(f"{state_file}: missing {', '.join(missing)}")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointUnusable(f"{path / '.metadata'}: unreadable ({type(e).__name__}: {e})") from None
    needed: dict[str, int] = {}  # shard file -> the bytes the metadata says it holds
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        have = shard.stat().st_size if shard.is_file() else None
        if have is None or have < size:
            what = "missing" if have is None else f"{have:,} bytes, cut short (the metadata expects {size:,})"
            raise CheckpointUnusable(f"{shard}: {what}")
    return state


def resume_point(out_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint that validates, with its trainer state; an unusable newer one is
    skipped with a warning that names it. None when there is none; CheckpointUnusable when every one fails."""
    problems = []
    for path in reversed(complete_checkpoints(out_dir)):
        try:
            state = validate_checkpoint(path)
        except CheckpointUnusable as e:
            problems.append(str(e))
            log.warning("checkpoint %s is unusable: %s", path.name, e)
            continue
        if problems:
            log.warning("resuming from the older checkpoint %s instead", path)
        return path, state
    if problems:
        raise CheckpointUnusable(
            f"no usable checkpoint in {checkpoint_root(out_dir)}: "
            + "; ".join(problems)
            + "; move the checkpoints aside (or use a new out_dir) to start over"
        )
    return None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class CheckpointSaveError(UserError, RuntimeError):
    """A checkpoint could not be written; the message says why, and what a checkpoint of this run needs."""


# errno of a failed write -> what the user is told
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded (ulimit -f)",
}


def _write_error(e: BaseException) -> str | None:
    """What an out-of-space failure looks like anywhere in an exception's chain. DCP raises a
    CheckpointException holding each rank's (exception, stack) after a round trip through pickle, which
    drops the OSError that torch.save's zip writer saw (its __context__); what survives is the writer's
    "unexpected pos" enforce, the mark of a short write."""
    seen, todo, short_write = set(), [e], False
    while todo:
        x = todo.pop()
        if isinstance(x, tuple):  # DCP's (exception, StackSummary)
            x = x[0] if x else None
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _WRITE_ERRORS:
            return _WRITE_ERRORS[x.errno]
        short_write = short_write or "unexpected pos" in str(x)
        todo += [x.__cause__, x.__context__, *getattr(x, "failures", {}).values()]
    return "a write came up short (a full disk, a quota or a file size limit)" if short_write else None


def _failure_reason(failure: BaseException | None) -> str:
    if failure is None:
        return "another rank's write failed"
    first_line = (str(failure).strip().splitlines() or [""])[0]
    return _write_error(failure) or f"{type(failure).__name__}: {first_line}"


def _checkpoint_bytes(out_dir: str | Path, model: torch.nn.Module) -> int:
    """What the next checkpoint will take on disk: the previous one's size, else 3 fp32 copies of the
    parameters (weights, Adam's two moments)."""
    previous = latest_checkpoint(out_dir)
    if previous is not None:
        return sum(f.stat().st_size for f in previous.iterdir() if f.is_file())
    return sum(3 * 4 * p.numel() for p in model.parameters() if p.requires_grad)  # DTensor numel: the full tensor's


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
    keep_best: bool = False,
) -> Path:
    """Collective: every rank calls it with the same step. Returns the complete checkpoint's path. A failed
    write (a full disk) raises CheckpointSaveError on every rank and leaves the previous checkpoint intact."""
    rank = dist.get_rank()
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    need = _checkpoint_bytes(out_dir, model)
    if rank == 0:
        free = shutil.disk_usage(root).free
        if free < need:
            log.warning(
                "%s free on %s, and a checkpoint of this run takes about %s: the save will likely fail",
                _gb(free),
                root,
                _gb(need),
            )
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    failure: BaseException | None = None
    try:
        state = {"model": _model_state(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=tmp)
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        failure = e
    failed = torch.tensor([failure is not None], dtype=torch.int32, device=next(model.parameters()).device)
    dist.all_reduce(failed)  # a rank whose own write failed must not leave the others waiting in a barrier
    if failed.item():
        previous = latest_checkpoint(out_dir)
        raise CheckpointSaveError(
            f"could not write checkpoint {tmp}: {_failure_reason(failure)}; a checkpoint of this run takes about {_gb(need)}, "
            f"{_gb(shutil.disk_usage(root).free)} are free there; "
            + (f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists")
        )
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
        for old in stale_checkpoints(out_dir, keep_last, keep_best):
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _model_state(model: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint holds of the model: the parameters that train (with LoRA, the adapters only: the
    frozen base is re-read from model.checkpoint on resume; with QLoRA also re-quantized, so neither its codes
    nor its scale buffers are saved)."""
    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    # a tied head's second name (output.weight) slips through ignore_frozen_params (torch 2.13): drop it too
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    frozen |= {n for n, _ in model.named_buffers()}  # only QLoRA's NF4 scales are buffers: derived from the base
    return {k: v for k, v in state.items() if k not in frozen}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_checkpoints(out_dir: str | Path) -> None:
    """Rank 0, at start: drops what a crash left behind: the `.tmp` directory of a save that did not finish,
    and a step directory without DCP's .metadata or the trainer state, i.e. an old checkpoint whose removal
    (keep_last) was cut short: a save renames its directory only once both are written, so no usable
    checkpoint looks like that."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return
    complete = set(complete_checkpoints(out_dir))
    for p in sorted(root.iterdir()):
        torn = p.name.startswith("step_") and p.name.endswith(".tmp")
        if p.is_dir() and (torn or (_STEP_DIR.fullmatch(p.name) and p not in complete)):
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The step, scheduler, data position and counters of a complete checkpoint (no tensors)."""
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: loads model and optimizer shards (resharding to this world size) and returns the
    trainer state. RNG states are restored when the world size matches the one that saved them."""
    state = {"model": _model_state(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    frozen = any(not p.requires_grad for p in model.parameters())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not frozen))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    trainer_state = read_trainer_state(path)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if trainer_state["world_size"] == dist.get_world_size() and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state
