"""A run's life around the training loop: the out_dir lock, dying with the launcher, and stopping cleanly.

- `OutDirLock`: one run per out_dir. An exclusive `fcntl.flock` on `out_dir/.c2a.lock`, taken by rank 0
  before anything in out_dir is written or removed; the OS releases it when the process dies (kill -9
  included), so a crashed run never leaves a stale lock. A second run is refused with the holder's pid,
  host and start time.
- `watch_parent()`: under torchrun, a rank whose launcher died exits within a second instead of finishing
  the run as an orphan (torchrun starts each worker in a session of its own, so killing torchrun alone
  leaves them running). A polling thread rather than `PR_SET_PDEATHSIG`: the death signal fires when the
  *thread* that forked the worker exits, which in torchrun's agent is not guaranteed to be the main one.
- `StopControl`: SIGTERM / SIGINT (what SLURM, Kubernetes and torchrun send before SIGKILL; torchrun
  forwards its own SIGTERM/SIGINT to every worker and SIGKILLs them 30 s later) mark a stop request; the
  loop finishes the optimizer step it is in, every rank agrees on the step to stop at, the run writes a
  checkpoint and exits with `EXIT_STOPPED`. A second signal exits at once. The same agreement carries the
  time-based checkpoint (`train.save_every_minutes`), decided by rank 0's clock so all ranks save together.

The agreement rides on the step's existing all-reduce of the loss (two more numbers), so it adds no
collective and no host sync to a step.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from c2a.errors import UserError
from c2a.train.parallel import Dist

LOCK_FILE = ".c2a.lock"
# sysexits.h EX_TEMPFAIL ("a temporary failure; the user is invited to retry"): a scheduler's requeue rule
# can tell "stopped on request, checkpoint written" from a crash (1) or a bad config (2)
EXIT_STOPPED = 75


class RunLocked(UserError, RuntimeError):
    """Another live process holds the out_dir lock."""


class OutDirUnusable(UserError, RuntimeError):
    """out_dir (or a directory the run writes in it) cannot be written."""


class RunStopped(Exception):
    """Raised on every rank after the checkpoint of a requested stop; the entry point exits EXIT_STOPPED."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped at step {step}; checkpoint {checkpoint}; re-run the same command to resume")
        self.step, self.checkpoint = step, checkpoint


class OutDirLock:
    """Exclusive lock on a run directory, held for the life of the process (or until `release`)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, stop it, "
                "or choose another --out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0
        )
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


_held: list[OutDirLock] = []  # the run's lock, referenced for the life of the process


def check_writable(out_dir: Path) -> None:
    """Every directory the run writes (out_dir, checkpoints/, and final/ beside them) before any training,
    not at the first save after hours of it. Raises OutDirUnusable naming the directory."""
    for folder in (out_dir, out_dir / "checkpoints"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".c2a-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OutDirUnusable(f"{folder} cannot be written ({e.strerror or e}); choose another --out_dir") from None


def claim_out_dir(out_dir: Path, d: Dist) -> None:
    """Collective: rank 0 checks that out_dir is writable and takes its lock, and every rank raises the
    same error if it could not, so no rank goes on alone into a barrier the others never reach."""
    error: RuntimeError | None = None
    if d.is_main:
        lock = OutDirLock(out_dir)
        try:
            check_writable(out_dir)
            lock.acquire()
            _held.append(lock)
        except (RunLocked, OutDirUnusable) as e:
            error = e
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise message[0]


def watch_parent(interval_s: float = 1.0) -> threading.Thread | None:
    """Under torchrun: exit this rank when its launcher dies (its parent pid changes). Returns the watcher
    thread, or None outside torchrun (a plain `python -m c2a.train` answers to its shell as usual)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                # no clean-up is possible or wanted: the other ranks and the rendezvous are going too, and a
                # partial checkpoint is left as a .tmp directory that the next run removes
                print(
                    f"[c2a rank {os.environ.get('RANK', '?')}] launcher (pid {parent}) died; exiting",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    thread = threading.Thread(target=watch, name="c2a-parent-watch", daemon=True)
    thread.start()
    return thread


class StopControl:
    """Stop requests (signals) and timed checkpoints, as two integers every rank sums into the step's
    all-reduce (c2a.train.loop.train_step reads the sums at the step's host sync)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, save_every_minutes: float = 0.0, is_main: bool = True) -> None:
        self.save_every_s = save_every_minutes * 60.0
        self.is_main = is_main
        self.requested: int | None = None  # the signal number of the first request
        self._last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            print(f"[c2a] second signal ({name}): stopping now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = signum
        if self.is_main:
            print(
                f"[c2a] {name} received: finishing this step, then saving a checkpoint (send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def local_flags(self, device: torch.device) -> torch.Tensor:
        """[stop requested here, a timed save is due] as int64 on `device` (the clock is rank 0's only)."""
        due = self.is_main and self.save_every_s > 0 and time.monotonic() - self._last_save >= self.save_every_s
        return torch.tensor([self.requested is not None, due], dtype=torch.int64, device=device)

    def saved(self) -> None:
        self._last_save = time.monotonic()
