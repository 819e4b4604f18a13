"""Experiment tracking: MLflow (`train.mlflow`) and Weights & Biases (`train.wandb`), both optional extras.

Rank 0 alone logs. Each tool keeps its own conventions: MLflow reads `MLFLOW_TRACKING_URI` (unset: a SQLite
database, out_dir/mlflow.db, a real backend that needs no server; MLflow 3 refuses a plain `file://` store
unless MLFLOW_ALLOW_FILE_STORE=true) and `MLFLOW_EXPERIMENT_NAME`; W&B reads `WANDB_PROJECT` (unset here:
"c2a"), `WANDB_MODE` (offline works without network and keeps its records in run-*.wandb under `WANDB_DIR`)
and `WANDB_DIR`. The run is named `train.run_name` (default: out_dir's name).

What is logged: the resolved config (as parameters / the run config, dotted keys), every metrics.jsonl
record's numbers at its step (loss, lr, grad_norm, tokens/s, MFU, peak and predicted memory, validation loss
and perplexity, ...), the run summary (final and validation loss, the demo's exact match before and after,
per task) and the out_dir path.

Resuming. The run ids are kept in out_dir/tracking.json: a resumed run reopens the same MLflow run and asks
W&B for the same id (offline W&B cannot resume a run: it starts a new one under that id, which `wandb sync`
uploads into the same run). The steps after the last checkpoint, which the resumed run trains again, are
logged again: MLflow's metric history then holds two values at those steps (the first run's, then the
resumed run's); W&B online drops a step it has already seen, and offline the new run's records start at the
checkpoint's step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from c2a.config import TrainConfig
from c2a.train.errors import TrainingError

log = logging.getLogger("c2a")

IDS_FILE = "tracking.json"
# the extra that installs each backend (pyproject.toml), and the module that proves it is there
EXTRAS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check_extras(cfg: TrainConfig) -> None:
    """Before anything is loaded: a backend that is asked for must be installed (one line naming its extra)."""
    for name, (extra, module) in EXTRAS.items():
        if getattr(cfg.train, name) and importlib.util.find_spec(module) is None:
            raise TrainingError(f"train.{name} = true needs the {extra} extra: pip install 'c2a[{extra}]'")


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as dotted keys (config.toml's values; [[data.mix]] as data.mix.K.path / .weight)."""
    flat: dict[str, Any] = {}

    def walk(d: Any, prefix: str) -> None:
        items = enumerate(d) if isinstance(d, (list, tuple)) else d.items()
        for k, v in items:
            if isinstance(v, (dict, list, tuple)):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(dataclasses.asdict(cfg), "")
    return flat


def numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a record or summary, nested dicts flattened with '/' (examples_by_source/PATH,
    demo_after/per_task/add/accuracy); None, strings and booleans left out."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class Tracker:
    """The run's MLflow run and W&B run (whichever are on), on rank 0."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.out = Path(cfg.out_dir).resolve()
        self.ids_path = self.out / IDS_FILE
        ids = json.loads(self.ids_path.read_text()) if self.ids_path.is_file() else {}
        name = cfg.train.run_name or self.out.name
        params = flat_config(cfg)
        self.mlflow = _MLflow(self.out, name, params, ids.get("mlflow")) if cfg.train.mlflow else None
        self.wandb = _Wandb(name, params, ids.get("wandb")) if cfg.train.wandb else None
        ids.update({k: b.run_id for k, b in (("mlflow", self.mlflow), ("wandb", self.wandb)) if b is not None})
        self.ids_path.write_text(json.dumps(ids, indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, at its step."""
        values = numbers({k: v for k, v in record.items() if k != "step"})
        for backend in (self.mlflow, self.wandb):
            if backend is not None:
                backend.log(values, record["step"])

    def finish(self, summary: dict[str, Any] | None) -> None:
        """The run's summary (None: it ended without one, stopped or failed), and the runs closed."""
        values = numbers(summary or {})
        for backend in (self.mlflow, self.wandb):
            if backend is not None:
                backend.finish(values, str(self.out), ok=summary is not None)


class _MLflow:
    def __init__(self, out: Path, name: str, params: dict[str, Any], run_id: str | None) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
        self.run_id = run.info.run_id
        known = run.data.params
        changed = sorted(k for k, v in params.items() if k in known and known[k] != str(v))
        if changed:  # MLflow parameters are immutable: a resumed run keeps the values it started with
            log.warning("mlflow: run %s keeps its first values of %s", self.run_id, ", ".join(changed))
        fresh = {k: v for k, v in params.items() if k not in known}
        keys = list(fresh)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 parameters per call
            mlflow.log_params({k: fresh[k] for k in keys[i : i + 100]})
        mlflow.set_tags({"out_dir": str(out), "c2a.run_name": name})
        log.info("mlflow: run %s (%s) at %s", self.run_id, name, uri)

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(_mlflow_names(values), step=step)

    def finish(self, values: dict[str, float], out: str, ok: bool) -> None:
        self.mlflow.log_metrics(_mlflow_names({f"summary/{k}": v for k, v in values.items()}))
        self.mlflow.end_run(status="FINISHED" if ok else "KILLED")


def _mlflow_names(values: dict[str, float]) -> dict[str, float]:
    """MLflow's metric names allow letters, digits, '_', '-', '.', ' ', ':' and '/': anything else becomes '_'."""
    return {"".join(c if c.isalnum() or c in "_-. :/" else "_" for c in k): v for k, v in values.items()}


class _Wandb:
    def __init__(self, name: str, params: dict[str, Any], run_id: str | None) -> None:
        import wandb

        project = os.environ.get("WANDB_PROJECT") or "c2a"
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=params)
        self.run_id = self.run.id
        log.info("wandb: run %s (%s) in project %s", self.run_id, name, project)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, values: dict[str, float], out: str, ok: bool) -> None:
        self.run.summary.update({**values, "out_dir": out})
        self.run.finish(exit_code=0 if ok else 1)
