"""AdamW (or its 8-bit-state variant, adamw8bit.py) and the learning-rate schedule: linear warmup, then cosine
decay (Stanford Alpaca's recipe).

Two cosines (train.lr_schedule): "c2a" starts the warmup at 1/warmup and ends the cosine exactly at the last
step, then holds it; "hf" is transformers' `get_cosine_schedule_with_warmup` step for step (the first step at
lr 0, the cosine ending one step after the last step, and no clamp: past its horizon the lr rises again),
which the released claude2-alpaca model trained with. train.warmup_rounding rounds warmup_ratio · steps up
(c2a, HF Trainer) or down (the released script's int()); train.schedule_steps fixes the horizon (0: the run's
own step count).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from c2a.config import TrainConfig
from c2a.train.errors import TrainingError


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters only
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]  # norm weights
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "adamw8bit":
        from c2a.train.adamw8bit import build_adamw8bit  # torchao: an optional extra, imported only when asked for

        return build_adamw8bit(groups, t.lr, (t.beta1, t.beta2), t.eps)
    # fused on CUDA: one kernel for all parameters. Elsewhere foreach, asked for: torch picks it by default
    # only on CUDA, and the per-tensor loop it picks on CPU dispatches 9 ops a parameter (351 a step for a
    # 4-layer model, against 94). Same arithmetic in the same order as the loop, bit for bit.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused, foreach=not fused)


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier for optimizer step s (0-based): linear warmup to 1 over `warmup_steps` steps (the first
    step already gets 1/warmup, not 0), then cosine decay to `min_ratio` at the last step."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps - 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def hf_cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LR multiplier for step s as transformers' get_cosine_schedule_with_warmup (num_cycles 0.5) computes
    it: s / warmup during the warmup (step 0 at 0), then 0.5 · (1 + cos(π · progress)) with progress
    (s − warmup) / (total − warmup), not clamped at 1, floored at 0."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return float(s) / float(max(1, warmup_steps))
        progress = float(s - warmup_steps) / float(max(1, total_steps - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def schedule_of(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    """What fixes the run's lr at every step: recorded in each checkpoint, checked on resume. (The schedule
    kind and a fixed horizon are recorded only when not the defaults, so older checkpoints still match.)"""
    t = cfg.train
    horizon = t.schedule_steps or total_steps
    rounding = math.ceil if t.warmup_rounding == "ceil" else math.floor
    warmup = rounding(t.warmup_ratio * horizon)
    schedule = {"total_steps": total_steps, "warmup_steps": warmup, "lr": t.lr, "min_lr_ratio": t.min_lr_ratio}
    if t.lr_schedule != "c2a":
        schedule["lr_schedule"] = t.lr_schedule
    if t.schedule_steps:
        schedule["schedule_steps"] = t.schedule_steps
    return schedule


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: dict[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule (`schedule_of`); "total_steps" is the steps the run takes, "schedule_steps" (when
    set) the horizon the cosine is built for."""
    horizon = schedule.get("schedule_steps") or schedule["total_steps"]
    if schedule.get("lr_schedule", "c2a") == "hf":
        factor = hf_cosine_with_warmup(horizon, schedule["warmup_steps"])
    else:
        factor = cosine_with_warmup(horizon, schedule["warmup_steps"], schedule["min_lr_ratio"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_schedule(resume: Path, saved: dict[str, Any], schedule: dict[str, Any]) -> None:
    """A resumed run must continue the learning-rate schedule it was on: a changed number of steps, warmup,
    lr or final ratio would restart the cosine partway down (the lr jumps), so it is refused, not guessed.
    With a fixed horizon (train.schedule_steps) the number of steps may change: the lr of each step does not."""
    before = saved.get("schedule")  # absent in checkpoints written before the schedule was recorded
    if before is None or before == schedule:
        return
    if schedule.get("schedule_steps") and before.get("schedule_steps"):
        # a fixed horizon: the lr of a step does not depend on how many steps the run takes
        before, schedule = dict(before, total_steps=0), dict(schedule, total_steps=0)
        if before == schedule:
            return
    diff = ", ".join(f"{k} {before[k]} -> {schedule[k]}" for k in schedule if before.get(k) != schedule[k])
    raise TrainingError(
        f"{resume} was trained on another learning-rate schedule ({diff}); resuming would make the lr jump. "
        f"Resume with the settings in {resume.parent.parent / 'config.toml'}, or train on from "
        f"{resume.parent.parent / 'final'} (or a checkpoint exported with c2a.model.convert) in a new out_dir "
        "with --model.checkpoint"
    )
