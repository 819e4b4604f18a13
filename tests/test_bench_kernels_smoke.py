"""benchmarks/kernels.py runs end to end (its smoke mode without CUDA) and writes its table, JSON and plot.
Nothing here looks at a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_smoke(tmp_path):
    args = [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--out", str(tmp_path), "--smoke", "--no-compile"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "provider" in done.stdout and "c2a" in done.stdout  # the printed table
    result = json.loads((tmp_path / "kernels.json").read_text())
    measured = {(r["kernel"], r["provider"], r["mode"]) for r in result["rows"] if r["ms"] is not None}
    for kernel in ("rmsnorm", "add_rmsnorm", "rotary", "swiglu", "cross_entropy"):
        for mode in ("fwd", "fwd+bwd"):
            assert (kernel, "c2a", mode) in measured and (kernel, "torch", mode) in measured
    assert ("cross_entropy", "torch-chunked", "fwd+bwd") in measured
    # the benchmark's own correctness column: c2a's forward against the eager reference, fp32 here
    diffs = [r["max_diff"] for r in result["rows"] if r["provider"] == "c2a" and r["mode"] == "fwd"]
    assert len(diffs) == 5 and all(d < 1e-4 for d in diffs), diffs
    assert (tmp_path / "kernels.png").stat().st_size > 10_000
