"""Several training sources with weights ([[data.mix]], c2a/data/mix.py): the counts of an epoch as the weights
say, a mid-epoch resume that continues bitwise, the per-source validation split, the config's tables and
refusals, the planner, and a real run whose metrics.jsonl counts examples by source."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import tomllib
from train_runs import ROOT, metrics, run_train

from c2a.config import MixSource, build_config, config_to_toml
from c2a.data.batching import MicroBatchLoader
from c2a.data.demo import DEMO_TOKENIZER, demo_split
from c2a.data.mix import MixedDataset
from c2a.plan.workload import resolve_data


class Marked:
    """n examples of source k whose every input id is 1000 * (k + 1) + i: a micro-batch names its examples."""

    def __init__(self, k: int, n: int) -> None:
        self.k, self.lengths = k, np.array([3 + (i * 7) % 11 for i in range(n)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full(self.lengths[i], 1000 * (self.k + 1) + i, dtype=np.int32)
        return ids, ids.copy()


def trained_examples(batches) -> Counter:
    """(source, example) -> how many times the micro-batches hold it (an example starts at position 0)."""
    seen = Counter()
    for mb in batches:
        starts = (mb.position_ids == 0) & (mb.labels != -100)
        for marker in mb.input_ids[starts].tolist():
            seen[(marker // 1000 - 1, marker % 1000)] += 1
    return seen


SIZES, WEIGHTS = (40, 30, 30), (2.0, 0.5, 1.5)


def loader(mixed, **kw) -> MicroBatchLoader:
    return MicroBatchLoader(mixed, seq_len=32, micro_batch_size=2, global_batch_rows=8, seed=5, **kw)


def test_one_epoch_holds_each_source_as_its_weight_says():
    mixed = MixedDataset([Marked(k, n) for k, n in enumerate(SIZES)], ["a", "b", "c"], WEIGHTS, seed=5)
    ld = loader(mixed)
    seen = trained_examples(ld)  # one epoch
    per_source = Counter()
    for (k, _), times in seen.items():
        per_source[k] += times
    assert dict(per_source) == {0: 80, 1: 15, 2: 45}  # 2 x 40, half of 30, 1.5 x 30
    assert all(seen[(0, i)] == 2 for i in range(40))  # weight 2: every example twice
    assert sorted(Counter(seen[(1, i)] for i in range(30)).items()) == [(0, 15), (1, 15)]  # a half, once
    assert sorted(Counter(seen[(2, i)] for i in range(30)).items()) == [(1, 15), (2, 15)]
    halves = [{i for i in range(30) if trained_examples(loader(m))[(1, i)]} for m in (mixed, _mixed(seed=6))]
    assert halves[0] != halves[1]  # the half is drawn by the seed
    assert ld.epoch == 1 and ld.examples_done_in_epoch().size == 0


def _mixed(seed: int = 5, val_fraction: float = 0.0) -> MixedDataset:
    return MixedDataset([Marked(k, n) for k, n in enumerate(SIZES)], ["a", "b", "c"], WEIGHTS, seed, val_fraction)


def test_resume_mid_epoch_is_bitwise():
    """A fresh mixed set and loader, loaded with the state taken inside a step, yield exactly the micro-batches
    the uninterrupted loader yields next, through the end of the next epoch."""
    whole = loader(_mixed(), world_size=2, rank=1)
    expected = [mb for _ in range(2) for mb in whole]  # two epochs
    first = loader(_mixed(), world_size=2, rank=1)
    it = iter(first)
    taken = [next(it) for _ in range(5)]  # 2 micro-batches per step on each rank: stopped inside step 3
    state = json.loads(json.dumps(first.state_dict()))  # as trainer_state.json stores it
    assert state["micro_step"] == 1
    resumed = loader(_mixed(), world_size=2, rank=1)
    resumed.load_state_dict(state)
    rest = [mb for _ in range(2) for mb in resumed][: len(expected) - 5]
    for a, b in zip(taken + rest, expected, strict=True):
        for name in ("input_ids", "labels", "position_ids"):
            assert getattr(a, name).equal(getattr(b, name))


def test_validation_split_is_per_source_and_never_trained():
    mixed = _mixed(val_fraction=0.2)
    held = Counter(mixed.heldout.source_of.tolist())
    assert dict(held) == {0: 8, 1: 6, 2: 6}  # a fifth of each source
    held_pairs = set(zip(mixed.heldout.source_of.tolist(), mixed.heldout.example_of.tolist()))
    trained = set(zip(mixed.source_of.tolist(), mixed.example_of.tolist()))
    assert not held_pairs & trained
    assert mixed.per_epoch() == {"a": 64, "b": 12, "c": 36}  # the weights on the 32 / 24 / 24 not held out


MIX_TOML = """
[data]
tokenizer = "{tok}"
[[data.mix]]
path = "{a}"
weight = 2.0
[[data.mix]]
path = "{b}"
weight = 0.5
template = "alpaca"
"""


@pytest.fixture
def sources(tmp_path):
    records = demo_split(70, 1)[0]
    paths = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, part in zip(paths, (records[:30], records[30:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def test_config_tables_round_trip_and_refusals(tmp_path, sources):
    a, b = sources
    cfg = build_config(tomllib.loads(MIX_TOML.format(tok=DEMO_TOKENIZER, a=a, b=b)))
    assert cfg.data.mix == (MixSource(str(a), 2.0), MixSource(str(b), 0.5, "alpaca"))
    assert build_config(tomllib.loads(config_to_toml(cfg))) == cfg  # out_dir/config.toml reads back the same
    assert "[[data.mix]]" not in config_to_toml(build_config({}))  # a run without a mix writes what it did
    with pytest.raises(KeyError, match="unknown key 'weigth'"):
        build_config({"data": {"mix": [{"path": "x", "weigth": 2}]}})
    with pytest.raises(ValueError, match="weight > 0"):
        build_config({"data": {"mix": [{"path": "x", "weight": 0}]}})
    config = tmp_path / "mix.toml"
    config.write_text(MIX_TOML.format(tok=DEMO_TOKENIZER, a=a, b=b))
    proc = subprocess.run(
        [sys.executable, "-m", "c2a.train", f"--config={config}", "--data.path=other.jsonl"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "[[data.mix]] and data.path" in proc.stderr


def test_planner_counts_each_source_by_its_weight(sources):
    a, b = sources
    cfg = build_config(tomllib.loads(MIX_TOML.format(tok=DEMO_TOKENIZER, a=a, b=b)), {"data.max_len": "64"})
    shape = resolve_data(cfg, None, None, None)
    assert shape.examples == 2 * 30 + 20 and "[[data.mix]]" in shape.source


def test_run_records_examples_by_source(tmp_path, sources):
    """One epoch of a real run over two sources (a fifth of each held out): its last record counts exactly
    the weighted examples of each, and every record counts whole steps of them."""
    a, b = sources
    config = tmp_path / "mix.toml"
    config.write_text(MIX_TOML.format(tok=DEMO_TOKENIZER, a=a, b=b))
    out = tmp_path / "run"
    run_train(1, out, f"--config={config}", "--train.epochs=1", "--data.val_fraction=0.2")
    rows = metrics(out)
    assert rows[-1]["examples_by_source"] == {str(a): 2 * 24, str(b): 16}  # 2 x (30 - 6), half of (40 - 8)
    totals = [sum(r["examples_by_source"].values()) for r in rows]
    assert totals == sorted(totals) and totals[0] > 0 and "val_loss" in rows[-1]
