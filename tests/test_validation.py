"""Validation during training (c2a/train/validation.py): the held-out split, the sharded validation loss
against `python -m c2a.eval` and across rank counts, keep_best pruning, and the config's errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from train_runs import metrics, run_train, trainer_state

from c2a.config import build_config
from c2a.data import TokenizedDataset
from c2a.data.demo import DEMO_TOKENIZER, demo_split
from c2a.eval import main as eval_main
from c2a.train.checkpoint import best_checkpoint, stale_checkpoints
from c2a.train.plot import main as plot_main
from c2a.train.plotting import figure
from c2a.train.validation import ExampleSubset, Validation, split_examples

# 128 demo records, a quarter held out; 6 steps of 16-example batches per epoch on the other 96
VAL = [
    "--data.demo_train_size=128",
    "--data.val_fraction=0.25",
    "--eval.every=2",
    "--train.epochs=1",
    "--train.lr=3e-3",
    "--train.keep_best=true",
    "--train.keep_last=1",
]


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_examples(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and sorted([*train, *val]) == list(range(1000))
    again_train, again_val = split_examples(1000, 0.1, seed=3)
    assert np.array_equal(again_val, val) and np.array_equal(again_train, train)
    assert not np.array_equal(split_examples(1000, 0.1, seed=4)[1], val)  # the seed draws it
    assert set(val) != set(range(100)) and set(val) != set(range(900, 1000))  # drawn, not a head or tail slice
    for n, fraction in ((10, 0.01), (3, 0.9)):  # nothing held out / nothing left to train on
        with pytest.raises(ValueError, match="data.val_fraction"):
            split_examples(n, fraction, seed=0)


def test_subset_reads_the_chosen_examples():
    ds = TokenizedDataset.from_records(demo_split(20, 1)[0], DEMO_TOKENIZER, 64)
    idx = np.array([3, 7, 19])
    sub = ExampleSubset(ds, idx)
    assert len(sub) == 3 and sub.lengths.tolist() == [len(ds[i][0]) for i in idx]
    for j, i in enumerate(idx):
        assert all(np.array_equal(a, b) for a, b in zip(sub[j], ds[i]))


def _fake_checkpoint(root: Path, step: int, val_loss: float | None) -> Path:
    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
    return path


def test_keep_best_pruning_keeps_the_lowest_validation_loss(tmp_path):
    # step 4 is the best; 8 and 12 are worse; 10 was a save_every checkpoint without a validation
    ckpts = {s: _fake_checkpoint(tmp_path, s, v) for s, v in ((4, 2.5), (8, 2.7), (10, None), (12, 2.9))}
    assert best_checkpoint(tmp_path) == ckpts[4]
    assert stale_checkpoints(tmp_path, keep_last=1, keep_best=True) == [ckpts[8], ckpts[10]]
    assert stale_checkpoints(tmp_path, keep_last=1, keep_best=False) == [ckpts[4], ckpts[8], ckpts[10]]
    assert stale_checkpoints(tmp_path, keep_last=3, keep_best=True) == []
    assert stale_checkpoints(tmp_path, keep_last=3, keep_best=False) == [ckpts[4]]
    # a resumed run starts from the best loss its checkpoints recorded: a later, worse evaluation is not "new best"
    cfg = build_config({}, {"out_dir": str(tmp_path), "data.val_fraction": "0.1", "train.keep_best": "true"})
    assert Validation(cfg, None, None, "").best == (2.5, "step_00000004")
    (ckpts[4] / "trainer_state.json").write_text("{")  # unreadable: not a candidate, resume reports it
    assert best_checkpoint(tmp_path) == ckpts[8]


def _held_out(tmp: Path) -> tuple[Path, int]:
    """The run's held-out records as a .jsonl file for `python -m c2a.eval`, and the trained targets of one
    epoch over the rest (the demo records encode one example each: none is dropped at max_len 64)."""
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in demo_split(128, 16)[0]]
    full = TokenizedDataset.from_records(records, DEMO_TOKENIZER, 64)
    assert len(full) == len(records)
    train_idx, val_idx = split_examples(len(records), 0.25, seed=0)
    path = tmp / "val.jsonl"
    path.write_text("".join(json.dumps(records[i]) + "\n" for i in val_idx))
    trained = sum(int((full[int(i)][1] != -100).sum()) for i in train_idx)
    return path, trained


def test_validation_loss_is_the_eval_cli_loss_on_any_rank_count(tmp_path):
    val_file, trained_targets = _held_out(tmp_path)
    two = run_train(2, tmp_path / "two", *VAL)
    one = run_train(
        1,
        tmp_path / "one",
        *VAL,
        "--eval.demo_accuracy=true",
        "--eval.max_examples=8",
        "--eval.max_new_tokens=8",
        "--eval.plot=true",
    )
    rows2, rows1 = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    # evaluated at eval.every steps and at the end, nowhere else; perplexity = exp(loss)
    assert [r["step"] for r in rows2 if "val_loss" in r] == [2, 4, 6]
    for r in rows2:
        if "val_loss" in r:
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
    # the split and the loss do not depend on the rank count (the training steps see the same rows too)
    for a, b in zip([r for r in rows2 if "val_loss" in r], [r for r in rows1 if "val_loss" in r], strict=True):
        assert a["step"] == b["step"] and a["val_targets"] == b["val_targets"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    # never trained on: one epoch trains exactly the targets of the examples that were not held out
    summary = two.stdout
    assert f"({trained_targets:,} trained targets)" in summary, summary
    # the last validation (at the last step, whose lr is 0) is `python -m c2a.eval`'s loss on the export
    assert (
        eval_main(
            [
                "--model",
                str(tmp_path / "two" / "final"),
                "--data",
                str(val_file),
                "--max-len",
                "64",
                "--json-out",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    cli = json.loads((tmp_path / "eval.json").read_text())
    last = rows2[-1]
    assert cli["targets"] == last["val_targets"]
    assert cli["loss"] == pytest.approx(last["val_loss"], rel=1e-5), (cli["loss"], last["val_loss"])
    assert re.search(rf"validation loss  {last['val_loss']:.4f} \(perplexity", summary)
    # keep_best: an improving validation is saved; its loss is in the trainer state
    assert "saved checkpoint" in two.stderr and "step_00000002" in two.stderr
    kept = sorted((tmp_path / "two" / "checkpoints").iterdir())
    states = [trainer_state(p) for p in kept]
    assert states[-1]["step"] == 6 and states[-1]["val_loss"] == pytest.approx(last["val_loss"])
    # the demo's exact match before and after training is in the last metrics record, as printed
    printed = re.search(r"demo exact match before ([\d.]+)% -> after ([\d.]+)%", one.stdout)
    assert printed, one.stdout
    assert 100 * rows1[-1]["demo_exact_match_before"] == pytest.approx(float(printed[1]), abs=0.05)
    assert 100 * rows1[-1]["demo_exact_match_after"] == pytest.approx(float(printed[2]), abs=0.05)
    # eval.plot: the curves are drawn at the end (the 2-rank run did not ask for them)
    assert (tmp_path / "one" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (
        tmp_path / "two" / "metrics.png"
    ).exists()
    assert f"(plotted: {tmp_path / 'one' / 'metrics.png'})" in one.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.val_fraction": "1.0"}, "data.val_fraction must be in [0, 1)"),
        ({"data.val_fraction": "0.1", "data.val_path": "v.jsonl"}, "set one"),
        ({"train.keep_best": "true"}, "train.keep_best needs a validation set"),
        ({"eval.every": "-1"}, "eval.every must be >= 0"),
        ({"eval.every": "10"}, "eval.every needs a validation set"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_config({}, overrides)


def test_missing_val_path_names_the_file(tmp_path):
    proc = run_train(1, tmp_path / "run", f"--data.val_path={tmp_path / 'nope.jsonl'}", expect=1)
    assert f"data file not found: {tmp_path / 'nope.jsonl'}" in proc.stderr


def test_plot_draws_the_logged_curves(tmp_path, capsys):
    rows = [
        {"step": 1, "loss": 5.0, "lr": 1e-3},
        {"step": 2, "loss": 4.0, "lr": 5e-4, "val_loss": 4.5},
        {"step": 3, "loss": None, "lr": 2e-4},
        {"step": 4, "loss": 3.0, "lr": 0.0, "val_loss": 3.9},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss_ax, lr_ax = figure(rows).axes
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_ax.get_lines()}
    assert curves == {
        "training loss": ([1, 2, 4], [5.0, 4.0, 3.0]),
        "validation loss": ([2, 4], [4.5, 3.9]),
    }  # a null loss is a gap
    assert list(lr_ax.get_lines()[0].get_ydata()) == [1e-3, 5e-4, 2e-4, 0.0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": \n')
    assert plot_main([str(tmp_path)]) == 1
    assert f"{tmp_path / 'metrics.jsonl'}:2: not a JSON object" in capsys.readouterr().err
    assert plot_main([str(tmp_path / "nowhere")]) == 1
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_val_path_padded_is_the_eval_cli_loss(tmp_path):
    """data.val_path (a file), padded batches (data.packing=false): the loss logged at the run's one step is
    python -m c2a.eval's on the same file and the exported weights."""
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in demo_split(0, 40)[1][:24]]
    val_file = tmp_path / "val.jsonl"
    val_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_train(
        1,
        tmp_path / "run",
        f"--data.val_path={val_file}",
        "--data.packing=false",
        "--train.max_steps=1",
        "--train.micro_batch=4",
    )
    last = metrics(tmp_path / "run")[-1]
    assert (
        eval_main(
            [
                "--model",
                str(tmp_path / "run" / "final"),
                "--data",
                str(val_file),
                "--max-len",
                "64",
                "--json-out",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    cli = json.loads((tmp_path / "e.json").read_text())
    assert last["step"] == 1 and last["val_targets"] == cli["targets"]
    assert last["val_loss"] == pytest.approx(cli["loss"], rel=1e-5)
