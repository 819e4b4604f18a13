"""A run's life with real processes and real signals: the out_dir lock, ranks dying with their launcher,
SIGTERM / SIGINT stopping at an agreed step with a checkpoint, timed checkpoints."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_runs import ROOT, TINY, metrics, train_cmd

from c2a.train.lifecycle import EXIT_STOPPED, LOCK_FILE, OutDirLock, RunLocked
from c2a.train.parallel import _free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended (exit {proc.returncode}) before {what}\n{out[-2000:]}\n{err[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


# --------------------------------------------------------------------------------------------- the lock


def test_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from c2a.train.lifecycle import OutDirLock; "
            "OutDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on "):
            OutDirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the OS drops the flock
        holder.wait()
    lock = OutDirLock(tmp_path)
    lock.acquire()
    assert f"pid {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
    lock.release()


# ------------------------------------------------------------------------------- signals and process life


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint_then_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--train.max_steps=40", "--train.lr=3e-3"]
    proc = start(train_cmd(2, out, *args))
    wait_for(lambda: steps_logged(out) >= 5, 240, "step 5", proc)
    proc.send_signal(signal.SIGTERM)  # what SLURM / Kubernetes send; torchrun forwards it to both ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports its own signal; the ranks exit EXIT_STOPPED
    stopped = [line for line in err.splitlines() if "stopped at step" in line]
    assert len(stopped) == 1, err[-3000:]  # said once (rank 0), not per rank
    step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
    assert 5 <= step < 40 and "re-run the same command to resume" in stopped[0]
    # the checkpoint is of the step every rank stopped at, and the metrics end there too
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{step:08d}"]
    assert metrics(out)[-1]["step"] == step and not (out / "final").exists()
    # the same command resumes from it and finishes: every step logged once, in order
    done = subprocess.run(train_cmd(2, out, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in done.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, 41)) and (out / "final" / "model.safetensors").is_file()


def test_sigterm_to_one_rank_stops_both_and_a_second_signal_aborts(tmp_path):
    out = tmp_path / "run"
    proc = start(train_cmd(2, out, "--train.max_steps=400"))
    wait_for(lambda: steps_logged(out) >= 3, 240, "step 3", proc)
    ranks = children(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGTERM)  # e.g. `scancel --signal=TERM` reaching the tasks, not the launcher
    _, err = proc.communicate(timeout=120)
    assert f"exitcode: {EXIT_STOPPED}" in " ".join(err.split()).replace("exitcode :", "exitcode:"), err[
        -3000:
    ]  # the rank's status
    step = int(err.split("stopped at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").is_file()
    assert json.loads((out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())["step"] == step

    # a second signal does not wait for the step: a single process (no torchrun), Ctrl-C then SIGTERM (two
    # different signals: the same one sent twice can merge into one delivery while it is pending)
    solo = tmp_path / "solo"
    proc = start(train_cmd(1, solo, "--train.max_steps=400"))
    wait_for(lambda: steps_logged(solo) >= 2, 240, "step 2", proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "second signal (SIGTERM): stopping now" in err, err[-2000:]
    assert not list((solo / "checkpoints").glob("step_*"))


def test_killing_torchrun_alone_takes_its_ranks_with_it(tmp_path):
    out = tmp_path / "run"
    proc = start(train_cmd(2, out, "--train.max_steps=400"))
    wait_for(lambda: steps_logged(out) >= 2, 240, "step 2", proc)
    ranks = children(proc.pid)
    assert len(ranks) == 2 and all(alive(r) for r in ranks)
    proc.kill()  # SIGKILL to the launcher only: it cannot forward anything
    proc.communicate()
    deadline = time.time() + 10
    while any(alive(r) for r in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(r) for r in ranks), "ranks outlived their launcher"
    logged = steps_logged(out)
    time.sleep(1.5)
    assert steps_logged(out) == logged and not (out / "final").exists()


def test_a_second_run_on_a_busy_out_dir_is_refused_and_timed_checkpoints_are_written(tmp_path):
    out = tmp_path / "run"
    # save_every_minutes=0.001: a checkpoint whenever 60 ms passed since the last one, i.e. every step here
    first = start(train_cmd(2, out, "--train.max_steps=30", "--train.save_every_minutes=0.001", "--train.keep_last=30"))
    wait_for(lambda: steps_logged(out) >= 3, 240, "step 3", first)
    second = subprocess.run(
        train_cmd(2, out, "--train.max_steps=30"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert second.returncode != 0
    refusals = [line for line in second.stderr.splitlines() if "is in use by another run" in line]
    assert len(refusals) == 1 and f"{out} is in use by another run (pid " in refusals[0], second.stderr[-3000:]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]  # the first run was not disturbed
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir())
    assert len(saved) >= 10 and saved[-1] == 30, saved  # timed saves between the steps, the final one at 30
    assert load_file(out / "final" / "model.safetensors")  # and the export is complete


# ------------------------------------------------------------------------- resuming: what may and may not


def run1(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(1, out, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_resume_validates_checkpoints_falls_back_and_refuses_a_changed_schedule(tmp_path):
    out = tmp_path / "run"
    args = ["--train.max_steps=4", "--train.save_every=2"]
    assert run1(out, *args).returncode == 0
    config = (out / "config.toml").read_text()

    # the same command on a finished run: says so, trains nothing, exports nothing
    again = run1(out, *args)
    assert (
        again.returncode == 0
        and "already finished at step 4" in again.stderr
        and "c2a training finished" not in again.stdout
    )

    # more steps on a finished run would restart the cosine partway down: refused, config.toml untouched
    more = run1(out, "--train.max_steps=6", "--train.save_every=2")
    assert more.returncode == 1 and "Traceback" not in more.stderr
    assert "was trained on another learning-rate schedule (total_steps 4 -> 6" in more.stderr, more.stderr[-2000:]
    assert (out / "config.toml").read_text() == config and not list(out.glob("config.*.toml"))

    # a shard of the newest checkpoint cut short (a full disk, a dead copy): named, and the older one is used
    shutil.rmtree(out / "final")
    shard = sorted((out / "checkpoints" / "step_00000004").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    resumed = run1(out, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint step_00000004 is unusable: {shard}: 1,000 bytes, cut short" in resumed.stderr
    assert "resuming from the older checkpoint" in resumed.stderr and "resumed from step_00000002" in resumed.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]

    # every checkpoint broken: one error naming each file, not a 134-line CheckpointException
    shutil.rmtree(out / "final")
    for state in (out / "checkpoints").glob("*/trainer_state.json"):
        state.write_text('{"step": 2\n"world_size": 1}')
    broken = run1(out, *args)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    error = [line for line in broken.stderr.splitlines() if "no usable checkpoint" in line]
    assert len(error) == 1 and error[0].count("trainer_state.json: unreadable (Expecting ',' delimiter") == 2, (
        broken.stderr[-2000:]
    )


def test_unwritable_out_dir_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")  # root ignores permission bits; this fails for anyone
    proc = run1(out, "--train.max_steps=2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{out / 'checkpoints'} cannot be written (" in proc.stderr and not (out / "metrics.jsonl").exists()


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["--train.max_steps=4", "--train.save_every=2"]
    assert run1(out, *args).returncode == 0
    shutil.rmtree(out / "final")
    (out / "checkpoints" / "step_00000004").rename(out / "checkpoints" / "step_00000004.moved")
    shard = max((out / "checkpoints" / "step_00000002").glob("*.distcp"), key=lambda f: f.stat().st_size)
    # every file the run writes before its next save is smaller than the checkpoint's shard
    proc = subprocess.run(
        train_cmd(1, out, *args),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(shard.stat().st_size // 2),
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        "could not write checkpoint" in proc.stderr
        and "step_00000004.tmp: a write came up short (a full disk, a quota or a file size limit)" in proc.stderr
    )
    assert (
        "a checkpoint of this run takes about " in proc.stderr
        and "the previous checkpoint step_00000002 is intact" in proc.stderr
    )
    state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2  # and the next run resumes from it


# ------------------------------------------------------------------------------------ two "nodes"


def test_two_agents_with_c10d_rendezvous_train_like_one_and_stop_together(tmp_path):
    """Two torchrun agents on localhost as two nodes (one process each, c10d rendezvous, HSDP with a replica
    per node, as examples/slurm.sbatch runs them) against one agent with two processes; then SIGTERM to one
    agent stops the whole job with one checkpoint."""
    args = ["--train.max_steps=60", "--train.replicas=2", "--train.lr=3e-3"]
    one = tmp_path / "one"
    proc = start(train_cmd(2, one, *args))
    wait_for(lambda: steps_logged(one) >= 6, 240, "step 6 of the one-agent run", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)

    two = tmp_path / "two"
    port = _free_port()
    agent = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=c2a-test",
        "-m",
        "c2a.train",
        f"--out_dir={two}",
        *TINY,
        *args,
    ]
    agents = [start(agent), start(agent)]
    wait_for(lambda: steps_logged(two) >= 6, 240, "step 6 of the two-agent run", agents[0])
    agents[1].send_signal(signal.SIGTERM)  # one node's agent: e.g. that node is preempted
    errs = [a.communicate(timeout=120)[1] for a in agents]
    stopped = [line for err in errs for line in err.splitlines() if "stopped at step" in line]
    assert len(stopped) == 1, "\n".join(e[-2000:] for e in errs)
    step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
    assert [p.name for p in (two / "checkpoints").iterdir()] == [f"step_{step:08d}"]
    ref, got = metrics(one), metrics(two)
    n = min(len(ref), len(got))
    assert n >= 6 and [r["step"] for r in got] == list(range(1, step + 1))
    for a, b in zip(ref[:n], got[:n]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-5
        ), a["step"]
