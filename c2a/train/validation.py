"""Validation during training: a held-out set, its loss computed on the sharded model, the best checkpoint.

The set. `data.val_path` names one (a .json / .jsonl / .parquet file, a hub dataset name, or a cache from
`python -m c2a.data.prepare`), tokenized like the training data. `data.val_fraction` holds out that share of
the training examples instead: a permutation of the example indices drawn from `train.seed` alone (no rank
count enters it, so 1 and 8 ranks hold out the same examples), the first round(fraction x n) of it held out,
the rest trained on. The training loader only ever sees the rest: the split replaces the run's training set.

The loss. The held-out examples go through the training loader (`MicroBatchLoader`), packed or padded as
training packs them, `train.micro_batch` rows per forward and one micro-batch per rank per loader step, so
every rank runs the same number of forwards (the sharded model's all-gathers are collectives: a rank with
one forward fewer would hang the others). Each rank sums the cross-entropy of its targets (`model.loss`
with normalizer 1) in float64, and one all-reduce gives the global sum and count: the loss is the mean over
every held-out target, token-weighted as a training step's loss is, and equal to what `python -m c2a.eval`
reports on the same records and weights (both sum through c2a.inference.target_loss_sum; its batches are
padded, not packed, and attention never crosses a packed document's boundary, so only the fp32 summation
order differs). The model is never gathered.

`train.keep_best`: an evaluation whose loss is the lowest so far also saves a checkpoint, its trainer state
records `val_loss`, and checkpoint pruning keeps that one beside the last `train.keep_last`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from c2a.config import TrainConfig
from c2a.data import TokenizedDataset, Tokenizer, load_records
from c2a.data.batching import ExampleDataset, MicroBatchLoader
from c2a.data.mix import MixedDataset
from c2a.data.sources import SKIP_HINT
from c2a.inference import target_loss_sum
from c2a.train.checkpoint import best_checkpoint, read_trainer_state
from c2a.train.parallel import Dist
from c2a.train.run_data import RunData

log = logging.getLogger("c2a")

# Mixed into the split's seed so that the held-out examples do not follow the training order's draw
# (which is seeded by (train.seed, epoch)).
_SPLIT_SALT = 0x7A1


class ExampleSubset:
    """The examples `indices` of a dataset, read as `MicroBatchLoader` reads datasets."""

    def __init__(self, dataset: ExampleDataset, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, indices
        self.lengths: np.ndarray = np.asarray(dataset.lengths)[indices]
        self.manifest = getattr(dataset, "manifest", {})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset[int(self.indices[i])]


def split_examples(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of n examples, each sorted; a function of (n, fraction, seed)."""
    held = round(fraction * n)
    if not 1 <= held < n:
        raise ValueError(
            f"data.val_fraction={fraction} of {n} training examples holds out {held}: "
            "it must leave at least one example on each side (or set data.val_path)"
        )
    order = np.random.default_rng([seed, _SPLIT_SALT]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def load_validation_set(cfg: TrainConfig, tokenizer: Tokenizer) -> TokenizedDataset:
    """data.val_path tokenized like the training data (every rank in memory: held-out sets are small)."""
    path = cfg.data.val_path
    if Path(path).is_dir():
        return TokenizedDataset.open(
            path,
            expect_tokenizer=tokenizer,
            expect_max_len=cfg.data.max_len,
            hint=f"data.val_path: rebuild {path} with the run's tokenizer and max_len",
        )
    loaded = load_records(path, skip_bad_rows=cfg.data.skip_bad_rows, skip_hint=SKIP_HINT)
    return TokenizedDataset.from_records(
        loaded.records, tokenizer, cfg.data.max_len, truncation=cfg.data.truncation, source=loaded.source
    )


def validation_loss(model: torch.nn.Module, loader: MicroBatchLoader, device: torch.device) -> tuple[float, int]:
    """Collective: (mean cross-entropy over every target of one epoch of `loader`, all ranks together; the
    number of those targets). Every rank must hold a loader over the same data with its own rank; an epoch
    gives every rank the same number of micro-batches (empty rows pad it)."""
    sums = target_loss_sum(model, loader, device)  # [sum of target losses, target count]
    dist.all_reduce(sums)
    total, targets = sums.tolist()  # the sync of an evaluation
    return total / max(targets, 1.0), int(targets)


class Validation:
    """The run's validation: what is held out, when it is evaluated, the best loss so far. With neither
    data.val_path nor data.val_fraction set it does nothing (`after_step` returns {})."""

    def __init__(self, cfg: TrainConfig, d: Dist, dataset: ExampleDataset | None, described: str) -> None:
        self.cfg, self.d, self.dataset, self.described = cfg, d, dataset, described
        self.last: dict[str, Any] = {}
        self.new_best = False  # the latest evaluation is the lowest loss so far (train.keep_best: save it)
        best = best_checkpoint(cfg.out_dir) if cfg.train.keep_best else None
        self.best = (read_trainer_state(best)["val_loss"], best.name) if best is not None else (math.inf, "")

    @classmethod
    def start(cls, cfg: TrainConfig, data: RunData, d: Dist) -> tuple[Validation, ExampleDataset]:
        """The run's validation, and the examples it trains on: with data.val_fraction, those of data.train
        that are not held out; otherwise data.train itself."""
        if cfg.data.val_path:
            dataset = load_validation_set(cfg, data.tokenizer)
            described = f"{cfg.data.val_path} ({len(dataset):,} examples)"
            train = data.train
        elif cfg.data.val_fraction and isinstance(data.train, MixedDataset):  # split per source (c2a.data.mix)
            dataset, train = data.train.heldout, data.train
            described = f"{len(dataset):,} examples held out of the {len(data.train.names)} [[data.mix]] sources, each split on its own (data.val_fraction={cfg.data.val_fraction})"
        elif cfg.data.val_fraction:
            train_idx, val_idx = split_examples(len(data.train), cfg.data.val_fraction, cfg.train.seed)
            dataset, train = ExampleSubset(data.train, val_idx), ExampleSubset(data.train, train_idx)
            described = f"{len(val_idx):,} of {len(train_idx) + len(val_idx):,} training examples held out (data.val_fraction={cfg.data.val_fraction})"
        else:
            return cls(cfg, d, None, ""), data.train
        every = f"every {cfg.eval.every} steps and at the end" if cfg.eval.every else "at the end"
        log.info(
            "validation: %s; evaluated %s%s", described, every, ", best checkpoint kept" if cfg.train.keep_best else ""
        )
        return cls(cfg, d, dataset, described), train

    def due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.eval.every
        return self.dataset is not None and (step == total_steps or (every > 0 and step % every == 0))

    def after_step(self, model: torch.nn.Module, step: int, total_steps: int) -> dict[str, Any]:
        """Collective at an evaluation step: {val_loss, val_ppl, val_targets, val_seconds}; {} otherwise."""
        self.new_best = False
        if not self.due(step, total_steps):
            return {}
        start = time.perf_counter()
        t = self.cfg.train
        loader = MicroBatchLoader(
            self.dataset,
            seq_len=self.cfg.data.max_len,
            micro_batch_size=t.micro_batch,
            global_batch_rows=t.micro_batch * self.d.world_size,
            mode="packed" if self.cfg.data.packing else "padded",
            rank=self.d.rank,
            world_size=self.d.world_size,
            seed=t.seed,
        )
        loss, targets = validation_loss(model, loader, self.d.device)
        # exp overflows a float past ~709
        self.last = {
            "val_loss": loss,
            "val_ppl": math.exp(loss) if loss < 700 else math.inf,
            "val_targets": targets,
            "val_seconds": time.perf_counter() - start,
        }
        if loss < self.best[0]:
            self.best = (loss, f"step_{step:08d}")
            self.new_best = t.keep_best
        log.info(
            "step %d: validation loss %.4f, perplexity %.3f (%d targets, %.1f s)",
            step,
            loss,
            self.last["val_ppl"],
            targets,
            self.last["val_seconds"],
        )
        return dict(self.last)

    def postfix(self) -> dict[str, str]:
        """The progress bar's validation field (the latest evaluation's loss)."""
        return {"val_loss": f"{self.last['val_loss']:.4f}"} if self.last else {}

    def summary(self) -> dict[str, Any]:
        """The run summary's validation entries (the last evaluation, and the best one with keep_best)."""
        if not self.last:
            return {}
        out = {k: self.last[k] for k in ("val_loss", "val_ppl", "val_targets")}
        if self.cfg.train.keep_best:
            out.update(
                best_val_loss=self.best[0], best_checkpoint=str(Path(self.cfg.out_dir) / "checkpoints" / self.best[1])
            )
        return out
