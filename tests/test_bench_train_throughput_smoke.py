"""benchmarks/train_throughput.py --smoke trains both sides (c2a packed, HF padded) for a few steps and writes
its table, JSON and plot. Times are not asserted; the counts that define the comparison are."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_smoke(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "train_throughput.py"),
            "--smoke",
            "--report",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "trained tokens/s" in proc.stdout and "c2a / baseline" in proc.stdout
    assert "step report (rank 0 of 1)" in proc.stdout  # --report: the c2a side's step, counted
    assert (tmp_path / "train_throughput.png").stat().st_size > 0
    result = json.loads((tmp_path / "train_throughput.json").read_text())
    setup, c2a, base = result["setup"], result["sides"]["c2a"], result["sides"]["baseline"]
    for side in (c2a, base):
        assert len(side["step_seconds_each"]) == setup["warmup"] + setup["steps"]
        assert math.isfinite(side["final_loss"]) and side["peak_memory_mib"] > 0
        assert 0 < side["trained_tokens_per_s"] < side["tokens_per_s"]  # prompts are not trained on
    # the same model size on both sides (c2a and HF count the same parameters)
    assert c2a["parameters"] == base["parameters"]
    assert c2a["step_report"]["families"]["matmul"]["ops"] > 0 and c2a["step_report"]["parameters"] == c2a["parameters"]
    # packing leaves almost no padding; padding each micro-batch to its longest leaves a lot
    assert c2a["padding_fraction"] < 0.05 < base["padding_fraction"]
    assert base["examples_per_step"] == setup["global_batch"]
    assert c2a["kernels"] == (os.environ.get("C2A_KERNELS") or "torch") and base["attention"] == "sdpa"
    # each side's rate from its raw measurements: the trained targets counted in each timed step (warmup
    # steps excluded) over the seconds measured for them; the reported ratio and the table's from those
    rates = {}
    for name, side in (("c2a", c2a), ("baseline", base)):
        timed = slice(setup["warmup"], None)
        rates[name] = sum(side["trained_tokens_each"][timed]) / sum(side["step_seconds_each"][timed])
        assert side["trained_tokens_per_s"] == pytest.approx(rates[name], rel=1e-9), name
    ratio = rates["c2a"] / rates["baseline"]
    assert result["ratios"]["trained_tokens_per_s"] == pytest.approx(ratio, rel=1e-9)
    row = next(line for line in proc.stdout.splitlines() if line.startswith("trained tokens/s"))
    assert row.split()[-1] == f"{ratio:.2f}x", row
