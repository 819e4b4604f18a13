"""Experiment tracking (c2a/train/tracking.py), read back with each tool's own reader: MLflow's client on a
SQLite store, W&B's offline run-*.wandb records through wandb's DataStore and protobuf Record. One short run
logs to both; it is stopped by SIGTERM after a few steps and resumed, so the same run continues in each.

The extras are optional: each test skips where its package is absent (.ci/run installs both and fails on a
skip)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_runs import ROOT, metrics, run_train, train_cmd

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("mlflow", "wandb")}
STEPS = 30
ARGS = [
    f"--train.max_steps={STEPS}",
    "--data.val_fraction=0.1",
    "--eval.every=10",
    "--train.run_name=tiny",
    *(f"--train.{name}=true" for name, have in HAVE.items() if have),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not any(HAVE.values()):
        pytest.skip("neither mlflow nor wandb is installed (pip install -e '.[mlflow,wandb]')")
    tmp = tmp_path_factory.mktemp("tracking")
    out = tmp / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp),
        "WANDB_SILENT": "true",
        "WANDB_PROJECT": "c2a-test",
    }
    proc = subprocess.Popen(
        train_cmd(1, out, *ARGS), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its third step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a checkpoint at the step it is in, then exit 75
    assert proc.wait(timeout=240) == 75, proc.stderr.read()[-3000:]
    stopped_at = metrics(out)[-1]["step"]
    assert stopped_at < STEPS, "the run finished before it was stopped"
    ids = json.loads((out / "tracking.json").read_text())
    resumed = run_train(1, out, *ARGS, env=env)  # the same command resumes
    assert "resumed from" in resumed.stderr
    return {"out": out, "tmp": tmp, "ids": ids, "stopped_at": stopped_at, "env": env}


def test_mlflow_sqlite_store_holds_every_step(run):
    if not HAVE["mlflow"]:
        pytest.skip("mlflow is not installed (pip install -e '.[mlflow]')")
    from mlflow import MlflowClient

    out, rows = run["out"], metrics(run["out"])
    client = MlflowClient(run["env"]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run["ids"]["mlflow"]]  # the resume continued the same run
    r = runs[0]
    assert r.info.run_name == "tiny" and r.info.status == "FINISHED"
    assert r.data.params["train.max_steps"] == str(STEPS) and r.data.params["data.val_fraction"] == "0.1"
    assert r.data.tags["out_dir"] == str(out.resolve())
    history = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss"))
    assert history == [(row["step"], row["loss"]) for row in rows]  # every step once, the logged loss
    assert len(history) == STEPS
    val = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val_loss"))
    assert val == [(row["step"], row["val_loss"]) for row in rows if "val_loss" in row]
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "predicted_peak_memory_mb", "val_ppl"):
        assert key in r.data.metrics, key
    assert r.data.metrics["summary/final_loss"] == rows[-1]["loss"]


def wandb_records(tmp: Path) -> list[tuple[str, object]]:
    """Every record of every offline run under WANDB_DIR, read with wandb's own reader, in file order."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    records = []
    for path in sorted(tmp.glob("wandb/offline-run-*/run-*.wandb")):
        store = DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            records.append((kind, getattr(record, kind)))
    return records


def test_wandb_offline_records_hold_the_logged_metrics(run):
    if not HAVE["wandb"]:
        pytest.skip("wandb is not installed (pip install -e '.[wandb]')")
    rows = metrics(run["out"])
    records = wandb_records(run["tmp"])
    starts = [r for kind, r in records if kind == "run"]
    # offline W&B cannot resume: the resumed session is a second offline run under the same id
    assert len(starts) == 2 and {s.run_id for s in starts} == {run["ids"]["wandb"]}
    assert {s.display_name for s in starts} == {"tiny"} and {s.project for s in starts} == {"c2a-test"}
    config = {u.key: json.loads(u.value_json) for u in starts[0].config.update}
    assert config["train.max_steps"] == STEPS and config["out_dir"] == str(run["out"])
    history = {}
    for kind, r in records:
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.item}
            history[items["_step"]] = items
    assert sorted(history) == [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
            if key in row:
                assert history[row["step"]][key] == pytest.approx(row[key], rel=1e-12), (row["step"], key)
    summary = {}
    for kind, r in records:
        if kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.update})
    assert summary["final_loss"] == rows[-1]["loss"] and summary["out_dir"] == str(run["out"].resolve())


def test_missing_extra_is_one_line_before_any_model(tmp_path):
    """Each extra made absent in the run's process (sys.modules[name] = None: find_spec then finds nothing, as
    where it is not installed): one line naming it, exit 1, before anything is loaded or written."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = sys.modules['wandb'] = None\n")
    for name in ("mlflow", "wandb"):
        out = tmp_path / name
        proc = run_train(1, out, f"--train.{name}=true", expect=1, env={"PYTHONPATH": str(site)})
        lines = proc.stderr.strip().splitlines()
        assert lines == [f"[c2a] error: train.{name} = true needs the {name} extra: pip install 'c2a[{name}]'"], lines
        assert not (out / "config.toml").exists() and "model:" not in proc.stderr
