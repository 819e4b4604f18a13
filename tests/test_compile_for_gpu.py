"""Every Triton kernel builds for a real GPU target, without a GPU.

The CPU interpreter, which runs the numerical tests, accepts code that Triton's compiler rejects (and
never shows register spills). Here benchmarks/kernels.py and benchmarks/attention.py in --compile-only
mode build each kernel for sm_90a (H100) with Triton's compiler and its bundled ptxas, at Llama-2-7B and
13B shapes, with the exact arguments, tiles and warps the launchers choose. A build that fails fails the
test; spills are reported by the scripts, not asserted (they are a speed question, measured on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_only(script: str, out: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for this process
    args = [sys.executable, str(ROOT / "benchmarks" / script), "--compile-only", "--out", str(out), *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(next(out.glob("*_compile.json")).read_text())


def test_pointwise_and_loss_kernels_build_for_sm90(tmp_path):
    report = compile_only("kernels.py", tmp_path, "--arch", "90", "--dtypes", "bf16,fp16,fp32", "--models", "7b,13b")
    rows = report["kernels"]
    assert not [r for r in rows if "error" in r]
    built = {r["kernel"] for r in rows}
    assert built == {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rotary_kernel", "_swiglu_fwd_kernel",
                     "_swiglu_bwd_kernel", "_cross_entropy_chunk_kernel"}, built  # fmt: skip
    assert all(isinstance(r["registers"], int) and 0 < r["registers"] <= 255 for r in rows)
    # both fused-residual variants of the norm, both rotation directions, the loss with and without grads
    assert {r["constexprs"].get("HAS_RESIDUAL") for r in rows if r["kernel"] == "_rms_norm_fwd_kernel"} == {True, False}
    assert {r["constexprs"].get("SIGN") for r in rows if r["kernel"] == "_rotary_kernel"} == {1, -1}
    assert {r["constexprs"].get("COMPUTE_GRAD") for r in rows if r["kernel"] == "_cross_entropy_chunk_kernel"} == {
        True, False}  # fmt: skip


def test_attention_kernels_build_for_sm90(tmp_path):
    report = compile_only("attention.py", tmp_path, "--arch", "90", "--head-dims", "64,128")
    rows = report["kernels"]
    assert not [r for r in rows if "error" in r]
    assert all(isinstance(r["registers"], int) and 0 < r["registers"] <= 255 for r in rows)
    # fwd, dK/dV, dQ for head dim 64 and 128 x packed or not x MHA (32:32) and GQA (32:8), and the delta kernel
    main = {(r["kernel"], r["Hd"], r["packed"], r["heads"]) for r in rows if r["kernel"] != "_attn_bwd_delta_kernel"}
    assert main == {(k, Hd, packed, heads) for k in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
                    for Hd in (64, 128) for packed in (False, True) for heads in ("32:32", "32:8")}  # fmt: skip
    assert {r["Hd"] for r in rows if r["kernel"] == "_attn_bwd_delta_kernel"} == {64, 128}
