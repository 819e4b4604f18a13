"""A run's metrics: the records of metrics.jsonl (this module owns the file: written, dropped past a resume
point, read back, amended), optional TensorBoard, the per-window numbers (loss, tokens/s, MFU, memory), the
run's counters, and the progress bar."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from c2a.config import LlamaConfig
from c2a.model.flops import attention_flops, matmul_flops_per_token, peak_flops
from c2a.train.parallel import Dist
from c2a.train.step import StepResult

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class Counters:
    """What a run has done so far; saved in every checkpoint (trainer_state.json) and restored on resume."""

    skipped_steps: int = 0
    bad_in_a_row: int = 0
    trained_tokens: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    demo_before: dict[str, Any] | None = None
    evals_since_best: int = 0  # validations without a lower loss (train.early_stop_patience)
    early_stopped: bool = False


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of OUT_DIR/metrics.jsonl; an error naming the file and line for one that is not a record."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a run writes it at its first logged step (train.log_every)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f'{path}:{n}: a record needs an integer "step"')
        rows.append(row)
    return rows


def last_record(out_dir: str | Path) -> dict[str, Any] | None:
    """The newest record of OUT_DIR/metrics.jsonl, or None when there is none."""
    path = Path(out_dir) / METRICS_FILE
    lines = path.read_text().strip().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else None


def add_to_last_record(out_dir: str | Path, fields: dict[str, Any]) -> None:
    """Adds `fields` to the newest record (the run's last step), rewriting the file atomically."""
    path = Path(out_dir) / METRICS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    if lines:
        lines[-1] = json.dumps({**json.loads(lines[-1]), **fields})
        _rewrite(path, lines)


def _rewrite(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


class MetricsWriter:
    """metrics.jsonl (one object per logged step, appended, so a resumed run continues the file) and
    optional TensorBoard. Rank 0 only.

    `after_step` is the step the run starts from (its checkpoint's, or 0): records of later steps are
    dropped from the file (and from TensorBoard), since they were logged by a run that died before its
    next checkpoint and are about to be run, and logged, again."""

    def __init__(self, out_dir: Path, tensorboard: bool, after_step: int = 0) -> None:
        self.path = out_dir / METRICS_FILE
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= after_step]
            if len(kept) != len(lines):
                _rewrite(self.path, kept)
                log.info(
                    "metrics.jsonl: dropped %d records after step %d (re-run from the checkpoint)",
                    len(lines) - len(kept),
                    after_step,
                )
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "train.tensorboard = true needs the tensorboard package: pip install tensorboard"
                ) from e
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=after_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def window_record(
    window: list[StepResult],
    seconds: float,
    step: int,
    epoch: int,
    lr: float,
    d: Dist,
    flops_per_token: int,
    model_cfg: LlamaConfig,
    peak: float | None,
    counters: Counters,
) -> dict[str, Any]:
    """Collective: sums this window's counts over ranks. The .item() calls here are the logging sync."""
    local = torch.tensor(
        [
            sum(r.tokens for r in window),
            sum(r.positions for r in window),
            sum(r.attn_sq for r in window),
            peak_memory_mb(d.device),
        ],
        dtype=torch.float64,
        device=d.device,
    )
    summed = local[:3].clone()
    dist.all_reduce(summed)
    peak_mb = local[3:].clone()
    dist.all_reduce(peak_mb, op=dist.ReduceOp.MAX)
    tokens, positions, attn_sq = (float(x) for x in summed.tolist())
    targets = float(sum(r.targets for r in window))
    # token-weighted over the window's applied steps; a skipped (non-finite) step is counted in skipped_steps,
    # and a window without any trained target (all labels -100) has no loss: null, not a perfect-looking 0
    applied = [r for r in window if r.finite]
    applied_targets = float(sum(r.targets for r in applied))
    loss = float(sum(r.loss * r.targets for r in applied)) / applied_targets if applied_targets else None
    counters.trained_tokens += int(targets)
    counters.tokens += int(tokens)
    record = {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": float(window[-1].grad_norm),
        "tokens_per_s": targets / seconds,
        "all_tokens_per_s": tokens / seconds,
        "padding_fraction": 1.0 - tokens / positions,
        "peak_memory_mb": float(peak_mb),
        "step_seconds": seconds / len(window),
        "skipped_steps": counters.skipped_steps,
    }
    if peak is not None:
        flops = tokens * flops_per_token + attention_flops(model_cfg, int(attn_sq))
        record["mfu"] = flops / seconds / (peak * d.world_size)
    return record


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StepLog:
    """The steps since the last record, timed: rank 0 writes each record (metrics.jsonl, TensorBoard) and
    shows the progress bar; every rank takes part in the record's all-reduces."""

    def __init__(
        self,
        out: Path,
        d: Dist,
        model_cfg: LlamaConfig,
        *,
        step: int,
        total_steps: int,
        tensorboard: bool,
        progress: bool,
        predicted_peak_mb: float,
        extra: Callable[[], dict[str, Any]] | None = None,
        sink: Callable[[dict[str, Any]], None] | None = None,
        flops_per_token: int | None = None,
    ) -> None:
        self.d, self.model_cfg, self.predicted_peak_mb = d, model_cfg, predicted_peak_mb
        self.extra = extra  # more fields for each record, asked on rank 0 (the mix's examples_by_source)
        self.sink = sink  # where else each record goes on rank 0 (W&B, MLflow)
        self.writer = MetricsWriter(out, tensorboard, after_step=step) if d.is_main else None
        self.bar = progress_bar(total_steps, step, progress and d.is_main)
        self.peak = peak_flops(d.device)
        # MFU's model FLOPs: 6 per weight per token, or what a LoRA run does (lora_matmul_flops_per_token)
        self.flops_per_token = flops_per_token or matmul_flops_per_token(model_cfg)
        self.window: list[StepResult] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """What follows is training time again (after a record, a checkpoint)."""
        self.window_start = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.window.append(result)
        if self.bar is not None:
            self.bar.update(1)

    def write(
        self, step: int, epoch: int, lr: float, counters: Counters, val: dict[str, Any], postfix: dict[str, str]
    ) -> None:
        """Collective: the window's record, with the validation numbers `val` of this step if any."""
        elapsed = (
            time.perf_counter() - self.window_start - val.get("val_seconds", 0.0)
        )  # validating is not training time
        record = {
            **window_record(
                self.window, elapsed, step, epoch, lr, self.d, self.flops_per_token, self.model_cfg, self.peak, counters
            ),
            **val,
        }
        record["predicted_peak_memory_mb"] = self.predicted_peak_mb  # c2a.plan's, beside peak_memory_mb
        counters.train_seconds += elapsed
        if self.writer is not None:
            record.update(self.extra() if self.extra is not None else {})
            self.writer.write(record)
            if self.sink is not None:
                self.sink(record)
            if self.bar is not None and record["loss"] is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", **postfix)
        self.window = []
        self.restart_clock()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """tqdm with ETA on rank 0; a no-op elsewhere or when disabled."""
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
