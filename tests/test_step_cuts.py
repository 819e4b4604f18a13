"""train.gather_once and train.reduce_once: the same training, less work outside the matmuls.

Losses: one torchrun per world size (1 and 2 ranks, gloo, bf16 compute) runs every on/off combination of the
two settings, and activation checkpointing of the first 2 blocks (what train.activation_checkpointing = "auto"
resolves to; at accumulation 3 only), and both with train.replicas = ranks (whole copies, no FSDP), at
accumulation 1 and 3 (tests/step_cuts_dist.py); each agrees with all off. Resume: a run
with both on, stopped at its step-2 checkpoint and resumed, ends bitwise where the uninterrupted one does,
and where the same run with both off does; resumed with train.micro_batch_auto and another
train.micro_batch, it keeps the micro-batch its checkpoint recorded. Work: the step report of the trainer's step on one rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_step_report import run_report
from train_runs import checkpoint_tensors, metrics, run_train, trainer_state

from c2a.config import LlamaConfig
from c2a.model.llama import Llama

ROOT = Path(__file__).resolve().parents[1]


with torch.device("meta"):
    DEMO_TENSORS = len(list(Llama(LlamaConfig.from_name("demo")).parameters()))  # 9 a block + embedding, norm, head


@pytest.mark.parametrize("world", [1, 2])
def test_each_cut_keeps_the_losses(tmp_path, world):
    out = tmp_path / "losses.json"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    proc = subprocess.run(
        [*launch, str(ROOT / "tests" / "step_cuts_dist.py"), str(out), "bf16"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    runs = json.loads(out.read_text())
    for accum in (1, 3):
        base = runs[f"default/accum{accum}"]
        for variant in ("gather_once", "reduce_once", "both", "replicated") + (("ac_first",) if accum == 3 else ()):
            run = runs[f"{variant}/accum{accum}"]
            key = f"{variant}/accum{accum}"
            # fp32 tolerance: the only change of order is where the fp32 gradient sums are formed
            assert run["losses"] == pytest.approx(base["losses"], rel=1e-6, abs=0), key
            # whole copies on two ranks also sum the clipping norm in another order (over whole tensors, not
            # shards: 7e-7 apart at step 1); the clip factor moves the fp32 masters by an ulp, which flips
            # a few bf16 roundings of the compute copies, so later gradient norms agree to bf16 rounding
            whole = variant == "replicated" and world > 1
            assert run["grad_norms"] == pytest.approx(base["grad_norms"], rel=1e-3 if whole else 1e-6, abs=0), key
            assert run["grad_norms"][0] == pytest.approx(base["grad_norms"][0], rel=1e-6, abs=0), key
            assert run["checksum"] == pytest.approx(base["checksum"], rel=1e-6 if whole else 1e-9), key
            if variant in ("gather_once", "ac_first") or world == 1:
                # the same casts and the same sums in the same order: bitwise (one rank: no FSDP at all)
                assert run["losses"] == base["losses"] and run["checksum"] == base["checksum"], key
        # train.activation_checkpointing = "first" with ac_blocks 2: blocks 0 and 1 recomputed, 2 and 3 not
        if accum == 3:
            assert runs["ac_first/accum3"]["checkpointed"] == 2 and base["checkpointed"] == 0
        # in a group of one, gather_once drops FSDP; on two ranks every variant is sharded
        assert runs[f"gather_once/accum{accum}"]["fsdp"] == (world > 1)
        assert runs[f"reduce_once/accum{accum}"]["fsdp"]
        # train.replicas = ranks with gather_once: a shard group of one at any world size, no FSDP; the
        # replicas sum each gradient once per step (one all-reduce a parameter), besides the step's two
        replicated = runs[f"replicated/accum{accum}"]
        assert not replicated["fsdp"]
        assert replicated["collectives"].get("allreduce_", 0) == 2 + (DEMO_TENSORS if world > 1 else 0)
        assert "_allgather_base_" not in replicated["collectives"]
        if world > 1:
            # the demo model's FSDP units: 4 blocks and the root. Per micro-batch, each block is gathered
            # for its forward and again for its backward, the root (never resharded) once, and each unit's
            # gradient reduce-scattered once; with the cuts, once per step
            layers, units = 4, 5

            def count(variant: str, op: str) -> int:
                return runs[f"{variant}/accum{accum}"]["collectives"].get(op, 0)

            assert count("default", "_allgather_base_") == accum * (2 * layers + 1)
            assert count("default", "_reduce_scatter_base_") == accum * units
            assert count("gather_once", "_allgather_base_") == count("both", "_allgather_base_") == units
            assert count("reduce_once", "_reduce_scatter_base_") == count("both", "_reduce_scatter_base_") == units


# train.micro_batch_auto keeps train.micro_batch on CPU; the resumed run below is configured with another one
CUTS = ["--train.gather_once=true", "--train.reduce_once=true", "--train.dtype=bf16", "--train.micro_batch_auto=true"]
STEPS = ["--train.max_steps=4", "--train.save_every=2", "--train.lr=3e-3", "--train.global_batch=6"]


def test_resume_with_the_cuts_is_bitwise(tmp_path):
    run_train(1, tmp_path / "whole", *STEPS, *CUTS)
    # the same run stopped after its step-2 checkpoint: its later checkpoint and final model removed
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    shutil.rmtree(tmp_path / "resumed" / "final")
    proc = run_train(1, tmp_path / "resumed", *STEPS, *CUTS, "--train.micro_batch=2")
    assert "resumed from" in proc.stdout + proc.stderr and "step_00000002" in proc.stdout + proc.stderr
    # a resumed run with train.micro_batch_auto keeps the micro-batch its checkpoint recorded (1, not 2)
    assert "train.micro_batch_auto: 1, as the checkpoint resumed from recorded" in proc.stdout + proc.stderr
    assert trainer_state(tmp_path / "resumed" / "checkpoints" / "step_00000004")["data"]["micro_batch_size"] == 1
    run_train(1, tmp_path / "plain", *STEPS, "--train.dtype=bf16")  # FSDP2, both cuts off
    last = "checkpoints/step_00000004"
    whole, resumed, plain = (
        checkpoint_tensors(tmp_path / run / last, tmp_path / run) for run in ("whole", "resumed", "plain")
    )
    assert whole["model"].keys() == resumed["model"].keys() == plain["model"].keys()
    for name in whole["model"]:
        assert torch.equal(resumed["model"][name], whole["model"][name]), name
        assert torch.equal(plain["model"][name], whole["model"][name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed["optim"]["state"][name][key], whole["optim"]["state"][name][key])
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [r["loss"] for r in metrics(tmp_path / "whole")]


WHOLE = ["--train.replicas=2", "--train.gather_once=true", "--train.reduce_once=true", "--train.dtype=bf16"]


def test_whole_copies_on_two_ranks_resume_bitwise(tmp_path):
    """train.replicas = ranks with gather_once: no FSDP on either rank; the DCP checkpoint of two whole copies
    resumes bit for bit, and what the copies do not run with yet is refused before training."""
    run_train(2, tmp_path / "whole", *STEPS, *WHOLE)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    shutil.rmtree(tmp_path / "resumed" / "final")
    proc = run_train(2, tmp_path / "resumed", *STEPS, *WHOLE)
    assert "resumed from" in proc.stdout + proc.stderr and "step_00000002" in proc.stdout + proc.stderr
    last = "checkpoints/step_00000004"
    whole, resumed = (checkpoint_tensors(tmp_path / run / last, tmp_path / run) for run in ("whole", "resumed"))
    for name in whole["model"]:
        assert torch.equal(resumed["model"][name], whole["model"][name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed["optim"]["state"][name][key], whole["optim"]["state"][name][key])
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [r["loss"] for r in metrics(tmp_path / "whole")]
    assert (tmp_path / "whole" / "final" / "model.safetensors").is_file()
    refused = run_train(2, tmp_path / "refused", *STEPS, *WHOLE, "--train.reduce_dtype=bf16", expect=1)
    assert "does not support train.reduce_dtype = bf16 yet" in refused.stdout + refused.stderr


def test_the_cuts_in_the_step_report(tmp_path):
    before = run_report(tmp_path, name="before")
    after = run_report(tmp_path, "--train.gather_once=true", "--train.reduce_once=true", name="after")
    assert after["loss"] == before["loss"]
    # one rank: no FSDP at all, one cast of each parameter per step
    assert after["families"]["fsdp copies"]["ops"] == 0 and before["families"]["fsdp copies"]["ops"] > 0
    assert after["overhead_bytes_per_param"] <= before["overhead_bytes_per_param"] / 3
    assert after["aten_ops"] < before["aten_ops"]


def test_the_planner_counts_what_the_cuts_keep():
    """gather_once keeps every block gathered in the compute dtype through the forward (FSDP2 frees each
    after its forward otherwise); reduce_once keeps every gradient unsharded in fp32 until the step's end."""
    from c2a.config import LlamaConfig
    from c2a.plan.memory import Workload, block_params, plan_memory

    m = LlamaConfig.from_name("llama2-7b")
    base = dict(micro_batch=1, seq_len=2048, ranks=8, accumulation=4)
    plain, gather, reduce = (
        plan_memory(Workload(m, **base, **cut)) for cut in ({}, {"gather_once": True}, {"reduce_once": True})
    )
    blocks_bf16 = m.n_layers * block_params(m) * 2
    assert gather.peak - plain.peak >= 0.9 * (blocks_bf16 - 2 * block_params(m) * 2)
    assert gather.fsdp >= blocks_bf16
    # fp32 gradients of all 6.7B parameters (27 GB) instead of an eighth of them
    assert reduce.peak - plain.peak >= 0.9 * 4 * m.num_params * 7 / 8
    # one rank: nothing is sharded, so accumulating unsharded costs nothing more
    one = dict(base, ranks=1)
    assert plan_memory(Workload(m, **one, reduce_once=True)).peak == plan_memory(Workload(m, **one)).peak
