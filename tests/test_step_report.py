"""c2a.train.step_report: a dispatch mode that counts one step's aten ops and bytes by family, and Triton's
launch hook for kernel launches. The expected bytes come from the tensors' shapes and dtypes; the expected
matmul count from the model's structure (7 linears a block, each 1 mm forward and 2 backward)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from c2a.train.step_report import StepCounter, StepReport, report_step, triton_launches

ROOT = Path(__file__).resolve().parents[1]


def test_bytes_and_families_of_single_ops():
    report = StepReport(parameters=10)
    x = torch.randn(100)
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    opt = torch.optim.SGD([p], lr=0.1, foreach=False)
    counter = StepCounter(report, opt)
    with counter:
        x.to(torch.bfloat16)  # a cast: reads 100 fp32, writes 100 bf16
        torch.mm(a, b)  # reads 32 + 128 floats, writes 64
        x.view(10, 10)  # a view: no bytes
        torch.empty(1000)  # an allocation: no bytes
        y = x * 2  # elementwise: reads 100, writes 100
        y.add_(x)  # in place: reads y and x, writes y
        torch.mul(x, x, out=y)  # into an out= tensor: reads x (once: the same tensor twice), writes y
        opt.step()
    counter.close()
    f = report.families
    assert (f["casts"].ops, f["casts"].read, f["casts"].written) == (1, 400, 200)
    assert (f["matmul"].ops, f["matmul"].read, f["matmul"].written) == (1, (32 + 128) * 4, 64 * 4)
    assert report.views == 1
    assert (f["elementwise"].read, f["elementwise"].written) == (400 + 800 + 400, 400 + 400 + 400)
    assert f["optimizer"].ops >= 1 and f["optimizer"].written >= 40  # the parameter is rewritten
    assert f["fsdp copies"].ops == 0
    d = report.as_dict()
    assert d["families"]["casts"]["bytes_per_param"] == pytest.approx(600 / 10)


def test_triton_launch_hook_counts_and_is_removed():
    knobs = pytest.importorskip("triton").knobs
    from triton.compiler.compiler import LazyDict

    counts = Counter()
    before = list(knobs.runtime.launch_enter_hook.calls)
    with triton_launches(counts):
        # what CompiledKernel's runner passes to the hook for each launch
        knobs.runtime.launch_enter_hook(LazyDict({"name": "_rmsnorm_fwd", "function": None, "stream": 0}))
        knobs.runtime.launch_enter_hook(LazyDict({"name": "_rmsnorm_fwd", "function": None, "stream": 0}))
    knobs.runtime.launch_enter_hook(LazyDict({"name": "_rmsnorm_fwd", "function": None, "stream": 0}))
    assert counts == {"_rmsnorm_fwd": 2}
    assert knobs.runtime.launch_enter_hook.calls == before


def test_report_step_reads_targets():
    class Result:
        targets = torch.tensor(7)

    report, result = report_step(lambda: Result(), None, parameters=3)
    assert report.trained_tokens == 7 and isinstance(result, Result)


def run_report(tmp_path: Path, *settings: str, name: str = "report") -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_report.py"), "--smoke", "--out", str(out), *settings],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "step report" in proc.stdout
    return json.loads(out.read_text())


def test_step_report_of_the_trainers_step(tmp_path):
    r = run_report(tmp_path)
    layers, accum = 2, r["accum"]
    # every block linear: one mm forward, two backward (input and weight gradients), per micro-batch
    assert r["top_ops"]["aten::mm"] == 7 * 3 * layers * accum
    fam = r["families"]
    assert all(fam[k]["ops"] > 0 for k in ("matmul", "fsdp copies", "casts", "optimizer", "elementwise"))
    # AdamW reads the fp32 parameter, gradient and both moments and writes three of them back: >= 28 B/param
    assert fam["optimizer"]["bytes_per_param"] >= 28
    assert r["overhead_bytes_per_param"] == pytest.approx(
        fam["fsdp copies"]["bytes_per_param"] + fam["casts"]["bytes_per_param"]
    )
    # FSDP2's cast of every fp32 parameter to bf16 (4 bytes read, 2 written) happens inside its scopes, at
    # least once per micro-batch (blocks twice: forward and backward), and is counted as its copying
    assert r["top_bytes"]["fsdp copies: aten::_to_copy"] >= accum * 6 * r["parameters"]
    assert r["trained_tokens"] > 0 and r["triton_launches"] == 0  # torch kernels on CPU
