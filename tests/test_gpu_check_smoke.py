"""benchmarks/gpu_check.sh in smoke mode (forced, so a CUDA machine runs it the same way): every stage runs
with the arguments the GPU run uses, and the report folder holds the promised files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["setup", "tests", "train", "attention", "kernels"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout")
def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SMOKE": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = {"gpu_check.md", "gpu_check.json", "gpu_check_details.tar.gz", "train_throughput.json", "train_throughput.png",
             "attention.png", "kernels.png"}  # fmt: skip
    assert {p.name for p in tmp_path.iterdir()} == names  # at most 8 files: what a device run sends back
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "smoke"
    assert [s["stage"] for s in report["stages"]] == STAGES and all(s["status"] == "pass" for s in report["stages"])
    assert report["setup"]["missing"] == []
    assert "tests collected" in report["tests"]["collected"]
    assert set(report["train"]["ratios"]) >= {"trained_tokens_per_s", "peak_memory_mib"}
    assert report["attention"]["rows"] and report["kernels"]["rows"]
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("| stage | status | seconds |", "## Training throughput", "## Attention", "## Kernels"):
        assert heading in md
    with tarfile.open(tmp_path / "gpu_check_details.tar.gz") as tar:
        logs = {Path(n).name for n in tar.getnames()}
    assert {f"{s}.log" for s in STAGES} <= logs
