"""Early stopping (`train.early_stop_patience = N`): the run stops when its validation loss has not improved
for N validations in a row, and final/ is the best checkpoint's model, not the last step's.

It needs `eval.every` (validations during the run) and turns on `train.keep_best`, so the best checkpoint is
on disk when the run stops. The count of validations since the best is one of the run's counters: it is
saved in every checkpoint and continues after a resume; a run that stopped early is finished, and running
its command again says so.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from c2a.train.checkpoint import best_checkpoint, load_checkpoint
from c2a.train.metrics import Counters

log = logging.getLogger("c2a")


def after_validation(patience: int, counters: Counters, val: dict[str, Any], improved: bool, step: int) -> bool:
    """Counts a validation (`val`, {} when none ran at this step); True when the run is to stop here."""
    if not patience or not val:
        return False
    counters.evals_since_best = 0 if improved else counters.evals_since_best + 1
    if counters.evals_since_best < patience:
        return False
    counters.early_stopped = True
    log.info(
        "step %d: early stop, no lower validation loss in the last %d validations (train.early_stop_patience=%d)",
        step,
        counters.evals_since_best,
        patience,
    )
    return True


def restore_best(out_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """Collective: loads the best checkpoint into `model` (unless it is this step's), so the export is the best
    model; the summary's entries saying which was exported."""
    best = best_checkpoint(out_dir)
    if best is None:
        return {}
    if best.name != f"step_{step:08d}":
        load_checkpoint(best, model, optimizer)
        log.info("final/ is the best checkpoint %s, not step %d", best, step)
    return {"exported_checkpoint": str(best)}
