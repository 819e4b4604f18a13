"""NF4 weights and 8-bit AdamW states under FSDP2 on 2 gloo ranks (one torchrun launch, tests/dist_lowbit.py):
sharded NF4 layers hold whole blocks, half the base each, and compute bit for bit what one process computes;
adamw8bit's states survive a DCP checkpoint, and a resumed run is bitwise the run that went straight through.
The adamw8bit test skips without torchao (the adamw8bit extra); .ci/run's last step installs it and fails on
a skip."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_lowbit import NF4_SHAPES, PLAN_SPEC, nf4_cases, nf4_reference
from test_plan import TOLERANCE, predicted

from c2a.kernels.nf4 import BLOCK
from c2a.model.quantized import NF4Linear

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lowbit")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(ROOT / "tests" / "dist_lowbit.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "C2A_KERNELS": "torch"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_nf4_shards_hold_whole_blocks_and_match_one_process(launch):
    r = torch.load(launch / "nf4.pt")
    for i, (out_f, in_f) in enumerate(NF4_SHAPES):
        blocks = -(-out_f * in_f // BLOCK)
        (codes0, qabsmax0), (codes1, qabsmax1) = (rank[i] for rank in r["shards"])
        # dim 0 split: whole 32-byte blocks, each rank ceil(blocks / 2) at most, none the whole base
        assert codes0[1:] == codes1[1:] == (32,), NF4_SHAPES[i]
        assert (codes0[0], codes1[0]) == (-(-blocks // 2), blocks - -(-blocks // 2)), NF4_SHAPES[i]
        assert (qabsmax0[0], qabsmax1[0]) == (codes0[0], codes1[0])
    weights, x, dy = nf4_cases()
    layers = [NF4Linear.from_weight(w, f"layer{i}") for i, w in enumerate(weights)]
    ref = nf4_reference(layers, x, dy)
    for i, layer in enumerate(layers):
        assert torch.equal(r["weight"][i], layer.dequantized(torch.bfloat16)), NF4_SHAPES[i]
        assert torch.equal(r["y"][i], ref["y"][i]), NF4_SHAPES[i]
        assert torch.equal(r["dx"][i], ref["dx"][i]), NF4_SHAPES[i]


def test_adamw8bit_resume_is_bitwise_on_two_ranks(launch):
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao (pip install -e '.[adamw8bit]')")
    from torchao.optim.subclass_8bit import OptimState8bit

    for rank in (0, 1):
        r = torch.load(launch / f"adamw8bit_rank{rank}.pt", weights_only=False)
        assert r["resumed_losses"] == r["straight_losses"]
        assert r["straight_losses"][-1] < r["straight_losses"][0]
        for name, p in r["straight_params"].items():
            assert torch.equal(r["resumed_params"][name], p), name
        quantized = 0
        for name, state in r["straight_states"].items():
            resumed = r["resumed_states"][name]
            assert type(resumed["exp_avg"]) is type(state["exp_avg"]), name  # restored as 8-bit, not as fp32
            assert torch.equal(resumed["step"], state["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                a, b = state[key], resumed[key]
                if isinstance(a, OptimState8bit):
                    quantized += 1
                    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), (name, key)
                else:
                    assert torch.equal(a, b), (name, key)
        assert quantized >= 2 * 8, "the block matrices' moments must be 8-bit"


def test_planner_matches_fsdp_mem_tracker_with_adamw8bit(launch):
    """The planner's adamw8bit step against FSDPMemTracker on 2 ranks (test_plan.py's measurement): every
    category within 10%, and the optimizer state far below AdamW's 8 bytes a parameter."""
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao (pip install -e '.[adamw8bit]')")
    plan = predicted(PLAN_SPEC, 2)
    fp32_plan = predicted(PLAN_SPEC.replace(":adamw8bit", ""), 2)
    assert plan.optimizer < 0.3 * fp32_plan.optimizer
    for rank, got in enumerate(json.loads((launch / "plan.json").read_text())):
        for key in ("params", "grads", "optimizer", "activations", "peak"):
            want = plan.peak_combined if key == "peak" else getattr(plan, key)
            assert abs(want - got[key]) <= TOLERANCE * got[key], (
                f"rank {rank} {key}: planned {want:,}, measured {got[key]:,}"
            )
