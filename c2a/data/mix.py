"""Several training sources with weights (`[[data.mix]]`): one example set whose epoch holds each source's
examples as many times as its weight says.

A weight is passes over its source per epoch. Source k with n_k examples and weight w_k contributes
floor(w_k) copies of every example plus a seeded subset of round(frac(w_k) x n_k) of them, drawn once from
(train.seed, k): 1.0 = each example once, 0.5 = the same seeded half every epoch, 2.0 = each twice, 1.5 =
each once and a seeded half again. An epoch therefore holds exactly round(w_k x n_k) examples of source k.
The mixed set is a fixed list of (source, example) pairs, so the training loader shuffles, packs, shards and
resumes it as any other data set: the data order is a function of the seed alone, and a resume mid-epoch
continues with the exact next micro-batch.

With data.val_fraction, each source is split on its own (seeded by train.seed and k) before weighting: its
held-out examples are never trained on, and the validation set holds every source's held-out examples once,
unweighted.

`examples_by_source` counts the examples trained so far per source path from the loader's position alone
(whole epochs done, plus the rows of the steps done in the current one), so a resumed run's counts are
those of an uninterrupted one without any saved counter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from c2a.data.batching import ExampleDataset, MicroBatchLoader

# Mixed into the seeds of a source's fractional pass and of its validation split, so that neither follows
# the draws of the training order (seeded by (train.seed, epoch)) or of each other.
_PASS_SALT, _SPLIT_SALT = 0x313, 0x7A2


class SourcePairs:
    """The examples `example_of[i]` of sources `source_of[i]`, read as MicroBatchLoader reads a data set."""

    def __init__(self, datasets: Sequence[ExampleDataset], source_of: np.ndarray, example_of: np.ndarray) -> None:
        self.datasets, self.source_of, self.example_of = list(datasets), source_of, example_of
        self.lengths: np.ndarray = np.zeros(len(source_of), dtype=np.int64)
        for k, ds in enumerate(self.datasets):
            mine = source_of == k
            self.lengths[mine] = np.asarray(ds.lengths, dtype=np.int64)[example_of[mine]]
        self.manifest = _combined_manifest(self.datasets, self.lengths)

    def __len__(self) -> int:
        return len(self.source_of)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.datasets[int(self.source_of[i])][int(self.example_of[i])]


class MixedDataset(SourcePairs):
    """The weighted training examples of several sources (module doc); `names[k]` is source k's path and
    `heldout` the per-source validation split (None without data.val_fraction)."""

    def __init__(
        self,
        datasets: Sequence[ExampleDataset],
        names: Sequence[str],
        weights: Sequence[float],
        seed: int,
        val_fraction: float = 0.0,
    ) -> None:
        trained, held = [], []
        for k, (ds, w) in enumerate(zip(datasets, weights)):
            train_idx, val_idx = split_source(len(ds), val_fraction, seed, k, names[k])
            held.append(val_idx)
            trained.append(weighted_indices(train_idx, w, seed, k))
        super().__init__(datasets, _source_ids(trained), np.concatenate(trained))
        self.names = list(names)
        self.heldout = SourcePairs(datasets, _source_ids(held), np.concatenate(held)) if val_fraction else None

    def per_epoch(self) -> dict[str, int]:
        """Examples of each source in one epoch (by path; sources with the same path are summed)."""
        return self.count(np.arange(len(self)))

    def count(self, indices: np.ndarray) -> dict[str, int]:
        """How many of these mixed-set examples come from each source (by path)."""
        per_source = np.bincount(self.source_of[indices], minlength=len(self.names))
        counts: dict[str, int] = {}
        for name, n in zip(self.names, per_source.tolist()):
            counts[name] = counts.get(name, 0) + n
        return counts


def weighted_indices(indices: np.ndarray, weight: float, seed: int, k: int) -> np.ndarray:
    """`indices` floor(weight) times, then a seeded round(frac(weight) x len) of them (sorted)."""
    whole = math.floor(weight)
    part = round((weight - whole) * len(indices))
    picks = np.random.default_rng([seed, _PASS_SALT, k]).permutation(len(indices))[:part]
    return np.concatenate([np.tile(indices, whole), indices[np.sort(picks)]]).astype(np.int64)


def split_source(n: int, fraction: float, seed: int, k: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) example indices of source k, each sorted; all trained when fraction is 0."""
    if not fraction:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    held = round(fraction * n)
    if not 1 <= held < n:
        raise ValueError(
            f"data.val_fraction={fraction} of [[data.mix]] source {name}'s {n} examples holds out {held}: "
            "it must leave at least one example on each side (or set data.val_path)"
        )
    order = np.random.default_rng([seed, _SPLIT_SALT, k]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def examples_by_source(loader: MicroBatchLoader, dataset: MixedDataset) -> dict[str, int]:
    """Examples trained so far by source path, all ranks together, at an optimizer-step boundary."""
    per_epoch = dataset.per_epoch()
    done = dataset.count(loader.examples_done_in_epoch())
    return {name: loader.epoch * per_epoch[name] + done[name] for name in per_epoch}


def _source_ids(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)])


def _combined_manifest(datasets: Sequence[ExampleDataset], lengths: np.ndarray) -> dict[str, Any]:
    """What the trainer reads of a data set's manifest: the truncation counts of every source, summed, and the
    chat template when every source with chat records was rendered with the same one."""
    manifests = [getattr(ds, "manifest", {}) for ds in datasets]
    counts = {"records": 0, "skipped_bad_rows": 0, "truncated": 0, "dropped": 0}
    for m in manifests:
        for key in counts:
            counts[key] += m.get("counts", {}).get(key, 0)
    counts["examples"] = len(lengths)
    templates = {m["chat_template"]["sha256"]: m["chat_template"] for m in manifests if "chat_template" in m}
    manifest: dict[str, Any] = {"counts": counts}
    if len(templates) == 1:
        manifest["chat_template"] = next(iter(templates.values()))
    elif templates:
        manifest["chat_template"] = {"name": "several", "sha256": "several"}  # final/ gets no single template
    return manifest
