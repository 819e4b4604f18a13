"""The run's outline, on every rank: start (or resume) it, train step by step with its records, validations
and checkpoints, then export the model and sum up.

The loop's body is one optimizer step (c2a.train.step) and what follows it: the schedule, the count of
non-finite steps, a validation when due, a metrics record when due, a checkpoint when due (and on a stop
request, after which the run ends with RunStopped).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from c2a.config import TrainConfig, compute_dtype
from c2a.data.batching import MicroBatch, MicroBatchLoader
from c2a.data.mix import MixedDataset, examples_by_source
from c2a.plan import predicted_peak_mb
from c2a.train.card import hardware, write_cards
from c2a.train.checkpoint import save_checkpoint
from c2a.train.demo_eval import evaluate_demo, record_demo
from c2a.train.early_stop import after_validation, restore_best
from c2a.train.errors import TrainingError
from c2a.train.export import export_final, trained_template
from c2a.train.lifecycle import RunStopped, StopControl
from c2a.train.metrics import StepLog, last_record
from c2a.train.parallel import Dist
from c2a.train.plotting import plot_metrics
from c2a.train.session import Session, claim, start
from c2a.train.step import StepResult, StepWork, train_step

log = logging.getLogger("c2a")


def run(cfg: TrainConfig, d: Dist) -> dict[str, Any]:
    """The whole run on every rank; returns the summary (rank 0 fills it)."""
    run_start = time.perf_counter()
    claim(cfg, d)
    s = start(cfg, d)
    if isinstance(s, int):
        log.info(
            "already finished at step %d; the final model is in %s (train more from it in a new out_dir "
            "with --model.checkpoint=%s)",
            s,
            Path(cfg.out_dir) / "final",
            Path(cfg.out_dir) / "final",
        )
        return {"already_finished": s, "out_dir": cfg.out_dir}
    demo = s.data.heldout is not None and cfg.eval.demo_accuracy
    try:
        if demo and s.counters.demo_before is None:
            s.counters.demo_before = evaluate_demo(s.model, s.model_cfg, s.data, cfg, d, "before training")
        train_loop(s)
        summary = finish(s, demo, run_start)
    except BaseException:
        if s.tracker is not None:
            s.tracker.finish(None)  # stopped or failed: the tracking run is closed as such
        raise
    if s.tracker is not None:
        s.tracker.finish(summary)
    return summary


def train_loop(s: Session) -> None:
    """Collective: optimizer steps from s.step to the schedule's last, with records, validations, checkpoints."""
    t, d = s.cfg.train, s.d
    steplog = StepLog(
        s.out,
        d,
        s.model_cfg,
        step=s.step,
        total_steps=s.total_steps,
        tensorboard=t.tensorboard,
        progress=t.progress,
        predicted_peak_mb=predicted_peak_mb(s.cfg, s.model_cfg, d.world_size, d.device, s.loader),
        extra=_mix_counts(s),
        sink=s.tracker.log if s.tracker is not None else None,
        flops_per_token=s.lora_flops_per_token(),
    )
    control = StopControl(t.save_every_minutes, d.is_main)
    control.install()
    steplog.restart_clock()
    s.model.train()
    batches: Iterator[MicroBatch] = iter(())
    while s.step < s.total_steps:
        epoch = s.loader.epoch + 1  # 1-based; read before the step's first micro-batch moves the loader
        micro, batches = _step_batches(s.loader, batches)
        result = train_step(
            s.model, s.optimizer, micro, t.grad_clip, d.device, control, t.loss_weighting, StepWork.of(t)
        )
        lr = s.scheduler.get_last_lr()[0]
        s.scheduler.step()
        s.step += 1
        steplog.add(result)
        too_many_bad = _count_bad_steps(s, result)
        val = s.validation.after_step(s.model, s.step, s.total_steps)  # collective at eval.every steps and the last
        early = after_validation(t.early_stop_patience, s.counters, val, s.validation.new_best, s.step)
        saving = (
            early
            or s.step == s.total_steps
            or too_many_bad
            or result.stop
            or result.save_due
            or (t.save_every and s.step % t.save_every == 0)
            or s.validation.new_best
        )
        # a checkpoint (and a validation) is also a logging point: its counters then hold every step it covers
        if s.step % t.log_every == 0 or saving or val:
            steplog.write(s.step, epoch, lr, s.counters, val, s.validation.postfix())
        if saving:
            path = save_checkpoint(
                s.out, s.step, s.model, s.optimizer, s.trainer_state(val.get("val_loss")), t.keep_last, t.keep_best
            )
            log.info("saved checkpoint %s", path)
            control.saved()
            steplog.restart_clock()  # the save is not training time
            if result.stop and s.step < s.total_steps:
                raise RunStopped(s.step, path)
        if too_many_bad:
            raise TrainingError(
                f"{s.counters.bad_in_a_row} non-finite steps in a row (train.max_bad_steps={t.max_bad_steps}); stopped at step "
                f"{s.step} with a checkpoint in {s.out / 'checkpoints'}; lower train.lr or check the data"
            )
        if early:
            break
    control.uninstall()  # from here on (export, evaluation) a signal interrupts as usual
    steplog.close()


def _mix_counts(s: Session) -> Callable[[], dict[str, Any]] | None:
    """With [[data.mix]]: each record's examples_by_source (examples trained so far, by source path)."""
    if not isinstance(s.data.train, MixedDataset):
        return None
    return lambda: {"examples_by_source": examples_by_source(s.loader, s.data.train)}


def _step_batches(
    loader: MicroBatchLoader, batches: Iterator[MicroBatch]
) -> tuple[list[MicroBatch], Iterator[MicroBatch]]:
    """This rank's micro-batches of the next optimizer step, and the iterator to take the following ones from."""
    micro: list[MicroBatch] = []
    while len(micro) < loader.accum_steps:
        b = next(batches, None)
        if b is None:
            batches = iter(loader)  # the next epoch (or the rest of the current one after a resume)
            continue
        micro.append(b)
    return micro, batches


def _count_bad_steps(s: Session, result: StepResult) -> bool:
    """Counts a non-finite step (its update was skipped); True when train.max_bad_steps came in a row."""
    c = s.counters
    c.bad_in_a_row = 0 if result.finite else c.bad_in_a_row + 1
    c.skipped_steps += not result.finite
    if not result.finite:
        log.warning(
            "step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped (%d in a row)",
            s.step,
            result.loss.item(),
            result.grad_norm.item(),
            c.bad_in_a_row,
        )
    return c.bad_in_a_row >= s.cfg.train.max_bad_steps


def finish(s: Session, demo: bool, run_start: float) -> dict[str, Any]:
    """Collective: final/ exported, the demo's exact match after training, the summary (filled on rank 0)."""
    cfg, d, c = s.cfg, s.d, s.counters
    template = trained_template(s.data, cfg.data.template) if d.is_main else None
    best = restore_best(cfg.out_dir, s.model, s.optimizer, s.step) if cfg.train.early_stop_patience else {}
    dtype, base = compute_dtype(cfg.train, d.device), cfg.model.checkpoint or cfg.model.preset
    final = export_final(s.model, s.model_cfg, s.data.tokenizer_path, s.out, dtype, d, template, s.lora, base)
    summary: dict[str, Any] = {
        "steps": s.step,
        "out_dir": str(s.out),
        "final": str(final),
        "train_seconds": c.train_seconds,
        "tokens": c.tokens,
        "trained_tokens": c.trained_tokens,
        "skipped_steps": c.skipped_steps,
        "wall_seconds": time.perf_counter() - run_start,
        **best,
    }
    if c.early_stopped:
        summary["early_stopped_at"] = s.step
    last = last_record(s.out) if d.is_main else None
    if last is not None and last["loss"] is not None:
        summary["final_loss"] = last["loss"]
    if demo:
        summary["demo_before"] = c.demo_before
        summary["demo_after"] = evaluate_demo(s.model, s.model_cfg, s.data, cfg, d, "after training")
    if not d.is_main:
        return summary
    summary.update(s.validation.summary())
    if summary.get("demo_after"):
        record_demo(s.out, summary["demo_before"], summary["demo_after"])
    if cfg.eval.plot:
        summary.update(_plot(s.out))
    summary["card"] = str(write_cards(final, cfg, summary, hardware(d.device, d.world_size)))
    return summary


def _plot(out: Path) -> dict[str, str]:
    """eval.plot: out_dir/metrics.png; a warning, never a failed run, when it cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning(
            "eval.plot: no metrics.png, matplotlib is not installed (pip install matplotlib; then python -m c2a.train.plot %s)",
            out,
        )
        return {}
    try:
        return {"plot": str(plot_metrics(out))}
    except Exception as e:
        log.warning(
            "could not draw metrics.png (%s: %s); the numbers are in %s", type(e).__name__, e, out / "metrics.jsonl"
        )
        return {}
