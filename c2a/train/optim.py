"""AdamW and the learning-rate schedule: linear warmup, then cosine decay (Stanford Alpaca's recipe)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from c2a.config import TrainConfig
from c2a.train.errors import TrainingError


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    t = cfg.train
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters only
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]  # norm weights
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters on CUDA; foreach (the CPU default) otherwise
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=device.type == "cuda")


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier for optimizer step s (0-based): linear warmup to 1 over `warmup_steps` steps (the first
    step already gets 1/warmup, not 0), then cosine decay to `min_ratio` at the last step."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps - 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def schedule_of(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    """What fixes the run's lr at every step: recorded in each checkpoint, checked on resume."""
    t = cfg.train
    warmup = math.ceil(t.warmup_ratio * total_steps)
    return {"total_steps": total_steps, "warmup_steps": warmup, "lr": t.lr, "min_lr_ratio": t.min_lr_ratio}


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: dict[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    factor = cosine_with_warmup(schedule["total_steps"], schedule["warmup_steps"], schedule["min_lr_ratio"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_schedule(resume: Path, saved: dict[str, Any], schedule: dict[str, Any]) -> None:
    """A resumed run must continue the learning-rate schedule it was on: a changed number of steps, warmup,
    lr or final ratio would restart the cosine partway down (the lr jumps), so it is refused, not guessed."""
    before = saved.get("schedule")  # absent in checkpoints written before the schedule was recorded
    if before is None or before == schedule:
        return
    diff = ", ".join(f"{k} {before[k]} -> {schedule[k]}" for k in schedule if before.get(k) != schedule[k])
    raise TrainingError(
        f"{resume} was trained on another learning-rate schedule ({diff}); resuming would make the lr jump. "
        f"Resume with the settings in {resume.parent.parent / 'config.toml'}, or train on from "
        f"{resume.parent.parent / 'final'} (or a checkpoint exported with c2a.model.convert) in a new out_dir "
        "with --model.checkpoint"
    )
