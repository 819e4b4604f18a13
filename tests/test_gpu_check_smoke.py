"""benchmarks/gpu_check.sh in smoke mode (forced, so a CUDA machine runs it the same way): every stage runs
with the arguments the GPU run uses, and the report folder holds the promised files. The attention and kernel
benchmarks are checked here, in gpu_check's run of them, not in a run of their own."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["setup", "tests", "gpu_path", "train", "attention", "kernels", "sweep"]


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)
def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SMOKE": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = {
        "gpu_check.md",
        "gpu_check.json",
        "gpu_check_details.tar.gz",
        "train_throughput.json",
        "train_throughput.png",
        "attention.png",
        "kernels.png",
    }
    assert {p.name for p in tmp_path.iterdir()} == names  # at most 8 files: what a device run sends back
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "smoke"
    assert [s["stage"] for s in report["stages"]] == STAGES and all(s["status"] == "pass" for s in report["stages"])
    assert report["setup"]["missing"] == []
    assert "tests collected" in report["tests"]["collected"]
    assert "tests collected" in report["gpu_path"]["collected"]  # the end-to-end suite imports and collects
    assert set(report["train"]["ratios"]) >= {"trained_tokens_per_s", "peak_memory_mib"}
    # the train stage's sides: c2a's defaults, the new settings, fp8, the HF baseline, and the peer stack, which
    # runs where the liger-kernel wheel was carried (here without Liger's kernels: CPU) and is skipped, said so,
    # where it was not
    train, md = report["train"], (tmp_path / "gpu_check.md").read_text()
    assert set(train["sides"]) - {"peer"} == {"c2a", "c2a-new", "c2a-fp8", "baseline"} and not train["failed"]
    wheel = list((ROOT / "benchmarks" / "wheels").glob("liger_kernel-*.whl"))
    if wheel:
        assert train["sides"]["peer"]["liger_kernel"] and not train["sides"]["peer"]["liger_kernels_applied"]
    else:
        assert "peer stack skipped: liger-kernel wheel not found" in train["skipped"]["peer"]
        assert "- peer: peer stack skipped: liger-kernel wheel not found" in md
    assert all(r["step_report"]["aten_ops"] > 0 for r in train["sides"].values())
    assert train["sides"]["c2a-new"]["settings"]["gather_once"] and train["sides"]["c2a-fp8"]["settings"]["fp8"]
    # the attention and kernel benchmarks (their own smoke tests until they ran twice in CI): every c2a row was
    # checked against its reference (SDPA, the eager ops) before it was timed; times are not asserted
    ours = [r for r in report["attention"]["rows"] if r["provider"] == "c2a"]
    assert {r["case"] for r in ours} == {"dense", "gqa", "packed"} and {r["mode"] for r in ours} == {"fwd", "fwd+bwd"}
    assert all(math.isfinite(r["ms"]) and r["max_diff"] < 1e-4 for r in ours), ours
    rows = report["kernels"]["rows"]
    measured = {(r["kernel"], r["provider"], r["mode"]) for r in rows if r["ms"] is not None}
    for kernel in ("rmsnorm", "add_rmsnorm", "rotary", "swiglu", "cross_entropy"):
        for mode in ("fwd", "fwd+bwd"):
            assert (kernel, "c2a", mode) in measured and (kernel, "torch", mode) in measured
    assert ("cross_entropy", "torch-chunked", "fwd+bwd") in measured
    diffs = [r["max_diff"] for r in rows if r["provider"] == "c2a" and r["mode"] == "fwd"]
    assert len(diffs) == 5 and all(d < 1e-4 for d in diffs), diffs
    assert min((tmp_path / f"{n}.png").stat().st_size for n in ("attention", "kernels")) > 10_000
    assert {r["kernel"] for r in report["sweep"]} == {"_fwd_blocks", "_bwd_dkdv_blocks", "_bwd_dq_blocks"}
    assert any(r["provider"] == "c2a-deterministic" and r["mode"] == "fwd+bwd" for r in report["attention"]["rows"])
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in (
        "| stage | status | seconds |",
        "## End-to-end GPU path",
        "## Training throughput",
        "## Attention",
        "## Attention tiles",
        "## Kernels",
    ):
        assert heading in md
    with tarfile.open(tmp_path / "gpu_check_details.tar.gz") as tar:
        logs = {Path(n).name for n in tar.getnames()}
    assert {f"{s}.log" for s in STAGES} <= logs


def test_gpu_report_survives_failed_stages_and_rows(tmp_path):
    """What a scarce GPU run sends back must not be lost to its own report: a timed-out stage, a benchmark
    row without a number (a provider that raised) and a missing benchmark JSON are reported, not fatal."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "kernels").mkdir(parents=True)
    out.mkdir()
    (work / "stages.tsv").write_text(
        "setup\t0\t900\tpython3 -\ngpu_path\t1\t80000\tpython3 -m pytest\n"
        "train\t124\t170000\tpython3 train\nkernels\t0\t5000\tpython3 k\n"
    )
    (work / "gpu_path.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="2" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_gpu_path" name="test_training_losses_match_the_torch_path" time="61.5"/>'
        '<testcase classname="tests.test_gpu_path" name="test_seeded_sampling" time="2.25"><failure message="x"/></testcase>'
        "</testsuite></testsuites>"
    )
    (work / "setup.json").write_text(
        json.dumps({"commit": "abc1234", "device": "NVIDIA H100", "packages": {"torch": "2.13"}})
    )
    (work / "train.log").write_text("step 1\nkilled: time limit\n")
    rows = [
        {
            "kernel": "cross_entropy",
            "shape": "16384x4096->32000",
            "mode": "fwd",
            "provider": "liger",
            "ms": None,
            "note": "error: OutOfMemoryError: CUDA out of memory",
        },
        {
            "kernel": "cross_entropy",
            "shape": "16384x4096->32000",
            "mode": "fwd",
            "provider": "c2a",
            "ms": 12.5,
            "gbps": None,
            "tflops": 171.9,
            "peak_mb": 2100.0,
        },
    ]
    (work / "kernels" / "kernels.json").write_text(json.dumps({"rows": rows}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), str(work), str(out), "gpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # a stage failed: the exit says so, after the report
    md = (out / "gpu_check.md").read_text()
    assert "| train | timeout | 170.0 |" in md and "killed: time limit" in md
    assert "2 tests: 1 passed, 1 failed" in md and "- FAILED tests.test_gpu_path::test_seeded_sampling" in md
    assert "| tests.test_gpu_path::test_training_losses_match_the_torch_path | passed | 61.5 |" in md
    assert "error: OutOfMemoryError" in md and "| 12.500 |" in md
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["train"] is None and report["attention"] is None and len(report["kernels"]["rows"]) == 2
    assert report["gpu_path"]["failed"] == ["tests.test_gpu_path::test_seeded_sampling"] and report["tests"] is None
    assert (out / "gpu_check_details.tar.gz").is_file()
