"""train.micro_batch_auto and train.activation_checkpointing = "auto": the planner's choice, checked against
the planner's own peaks at each candidate for device memories set around them; the invariants (the same
rows, steps and schedule); the CPU default.
The losses of a partly checkpointed model ("first", what "auto" resolves to) are compared with none in
tests/step_cuts_dist.py; a resumed run keeping its recorded micro-batch is checked in tests/test_step_cuts.py."""

from __future__ import annotations

import dataclasses

import tomllib
import torch

from c2a.config import LlamaConfig, build_config, config_to_toml
from c2a.data import Tokenizer
from c2a.data.sources import demo_dataset, resolve_tokenizer
from c2a.options import parse_args
from c2a.plan.auto import fewest_checkpointed_blocks, micro_batch_sizes, resolve_auto
from c2a.plan.memory import Workload, plan_memory
from c2a.train.auto_settings import resolve_run_settings
from c2a.train.optim import schedule_of
from c2a.train.parallel import Dist
from c2a.train.run_data import make_loader, step_rows

# Llama-2-7B's shapes, 8 layers, rows of 2048 on one rank: what gpu_check trains
MODEL = LlamaConfig.from_name("llama2-7b").replace(n_layers=8)
ROWS = 12


def peak(mb: int, ac: str = "none", blocks: int = 0) -> int:
    w = Workload(MODEL, mb, 2048, accumulation=ROWS // mb, activation_checkpointing=ac, ac_blocks=blocks)
    return plan_memory(w).peak


def choose(configured: int, usable: float | None, ac: str = "none", recorded: int | None = None):
    cfg = build_config({}, {"train.micro_batch": str(configured), "train.micro_batch_auto": "true"})
    train = dataclasses.replace(cfg.train, activation_checkpointing=ac)
    w = Workload(MODEL, configured, 2048, accumulation=ROWS // configured)
    return resolve_auto(train, w, ROWS, usable, recorded)[0]


def test_the_largest_micro_batch_that_fits_among_those_that_keep_the_rows():
    assert micro_batch_sizes(ROWS, 1) == [12, 6, 4, 3, 2, 1] and micro_batch_sizes(ROWS, 2) == [6, 3, 2, 1]
    peaks = {m: peak(m) for m in (12, 6, 4, 3, 2, 1)}
    assert sorted(peaks.values()) == [peaks[m] for m in (1, 2, 3, 4, 6, 12)]  # more rows, more memory
    # memory exactly at a size's peak admits it; a byte less falls to the next divisor (never 5)
    for m, smaller in ((12, 6), (6, 4), (4, 3), (3, 2)):
        assert choose(1, peaks[m]).micro_batch == m
        assert choose(1, peaks[m] - 1).micro_batch == smaller
    assert choose(2, peaks[4] + (peaks[6] - peaks[4]) // 2).micro_batch == 4  # auto may grow past the configured
    assert choose(4, peaks[2]).micro_batch == 2  # and shrink below it
    assert choose(3, peaks[1] - 1).micro_batch == 3  # nothing fits: the configured value
    assert choose(3, None).micro_batch == 3  # no device to plan for (CPU): the configured value
    assert choose(3, peaks[12], recorded=2).micro_batch == 2  # a resumed run keeps what it recorded


def test_the_fewest_checkpointed_blocks_that_fit():
    mb = 6
    peaks = [peak(mb, "first", k) for k in range(MODEL.n_layers + 1)]
    assert peak(mb, "full") == peaks[-1] and peak(mb, "none") == peaks[0]
    # each of the first 7 blocks recomputed lowers the peak; the last one's recomputation happens at the
    # peak (the start of the backward), so checkpointing it too saves nothing
    assert all(a > b for a, b in zip(peaks[:8], peaks[1:8])) and peaks[8] == peaks[7]
    w = Workload(MODEL, mb, 2048, accumulation=ROWS // mb)
    for k in (0, 1, 3, 7):
        assert fewest_checkpointed_blocks(w, peaks[k]) == k
        if k:
            assert fewest_checkpointed_blocks(w, peaks[k] - 1) == (k + 1 if k < 7 else None)
    cfg = build_config({}, {"train.micro_batch": str(mb), "train.activation_checkpointing": "auto"})
    resolved = [resolve_auto(cfg.train, w, ROWS, usable)[0] for usable in (peaks[0], peaks[3], peaks[7], None)]
    assert [(t.activation_checkpointing, t.ac_blocks) for t in resolved] == [
        ("none", 0),
        ("first", 3),
        ("first", 7),
        ("none", 0),  # CPU
    ]
    t, notes = resolve_auto(cfg.train, w, ROWS, peaks[7] - 1)  # nothing fits: every block, said so
    assert (t.activation_checkpointing, t.ac_blocks) == ("full", 8) and "still the planner's peak" in notes[0]
    # both auto: checkpointing first, at the configured micro-batch; then the largest micro-batch that fits
    # with it, so the micro-batch never adds recomputation
    both = dataclasses.replace(cfg.train, micro_batch_auto=True)
    assert peak(12, "first", 3) > peaks[3]
    t = resolve_auto(both, w, ROWS, peaks[3])[0]
    assert (t.activation_checkpointing, t.ac_blocks, t.micro_batch) == ("first", 3, 6)
    usable = peak(12, "first", 3)  # micro-batch 12 would fit with 3 blocks checkpointed, 6 with 2 already
    assert peaks[2] <= usable < peaks[1] and peak(12, "first", 2) > usable
    t = resolve_auto(both, w, ROWS, usable)[0]
    assert (t.activation_checkpointing, t.ac_blocks, t.micro_batch) == ("first", 2, 6)


def test_auto_never_changes_the_rows_steps_or_schedule():
    """The demo data packed into rows of 64; the step as micro-batch 1 gives it (on one rank), and the same
    split by the micro-batch auto chooses for a device that holds micro-batch 4's peak."""
    overrides = {
        "data.demo_train_size": "300",
        "data.max_len": "64",
        "train.global_batch": "40",
        "train.micro_batch": "1",
        "train.micro_batch_auto": "true",
    }
    cfg = build_config({}, overrides)
    dataset, _ = demo_dataset(cfg, Tokenizer(resolve_tokenizer(cfg)))
    d = Dist(0, 1, 0, torch.device("cpu"), None)
    rows = step_rows(cfg, dataset, 1)[0]
    model = LlamaConfig.from_name("demo")
    w = Workload(model, 1, 64, ranks=1, accumulation=rows, backend="torch", cuda=False, compute_bytes=4)
    sizes = micro_batch_sizes(rows, 1)
    assert 1 < sizes[-2] < rows  # the step splits several ways
    target = sizes[-2]  # the smallest size above 1
    usable = plan_memory(dataclasses.replace(w, micro_batch=target, accumulation=rows // target)).peak
    auto = resolve_run_settings(cfg, model, d, dataset, rows, None, usable_bytes=usable)
    assert auto.train.micro_batch == target
    assert resolve_run_settings(cfg, model, d, dataset, rows, None).train.micro_batch == 1  # CPU: configured
    plain, _ = make_loader(cfg, dataset, d, rows=rows)
    chosen, _ = make_loader(auto, dataset, d, rows=rows)
    assert chosen.accum_steps * target == plain.accum_steps == rows
    assert chosen.total_steps(2) == plain.total_steps(2)
    assert schedule_of(auto, chosen.total_steps(2)) == schedule_of(cfg, plain.total_steps(2))
    for _ in range(2):  # the same rows in each step, only grouped differently
        a = torch.cat([next(iter(plain)).input_ids for _ in range(plain.accum_steps)])
        b = torch.cat([next(iter(chosen)).input_ids for _ in range(chosen.accum_steps)])
        assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))


def test_the_planner_cli_shows_the_choice():
    """python -m c2a.plan resolves the "auto" settings as the trainer would on that card, and plans the run so."""
    from c2a.plan.report import plan, table
    from c2a.plan.workload import GPUS, Machine

    cfg = build_config(
        {},
        {
            "model.preset": "llama2-7b",
            "data.max_len": "2048",
            "train.global_batch": "128",
            "train.micro_batch": "1",
            "train.micro_batch_auto": "true",
            "train.activation_checkpointing": "auto",
        },
    )
    flops, memory = GPUS["h100"]
    result = plan(cfg, Machine(8, 1, "H100", memory, flops, 0.4, "given"), 52002, 400, 0.6)
    w = result["workload"]
    # the step's rows as micro-batch 1 makes them, split by the micro-batch chosen
    rows = 8 * round(128 / (2048 / 400) / 8)
    assert w["micro_batch"] * w["accumulation"] * 8 == rows and w["micro_batch"] in micro_batch_sizes(rows, 8)
    assert w["activation_checkpointing"] in ("none", "first", "full") and result["fits"]
    assert [line.split(":")[0] for line in result["auto"]] == [
        "train.activation_checkpointing = auto",
        "train.micro_batch_auto",
    ]
    assert result["auto"][1] in table(result)


def test_micro_batch_auto_as_a_value():
    """train.micro_batch = "auto" (TOML or --train.micro_batch=auto): micro_batch_auto on the step of micro-batch 1."""
    toml = build_config({"train": {"micro_batch": "auto", "global_batch": 16}})
    flag = parse_args(["--train.micro_batch=auto", "--train.global_batch=16"])
    spelled = build_config({}, {"train.micro_batch": "1", "train.micro_batch_auto": "true", "train.global_batch": "16"})
    assert toml == flag == spelled and spelled.train.micro_batch == 1 and spelled.train.micro_batch_auto
    assert build_config(tomllib.loads(config_to_toml(toml))) == toml  # config.toml spells it out
