"""train.optimizer = "adamw8bit" (c2a/train/adamw8bit.py) in one process: losses within 2% of AdamW's over 10
steps with weight decay, clipping and the cosine schedule; weight decay as AdamW's; the state's bytes as the
planner counts them; the 7B full fine-tune's plan on one 80 GB card; a missing torchao refused in one line
before anything loads. The 2-rank resume and FSDPMemTracker checks are in test_lowbit_distributed.py.

Tests that run the optimizer skip without torchao (the adamw8bit extra); .ci/run's last step installs it and
fails on a skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_plan import LLAMA2_7B, plan_cli  # noqa: F401  (a fixture)
from train_runs import run_train

from c2a.config import LlamaConfig, build_config
from c2a.model import Llama
from c2a.model.lora import LORA_MODULES, apply_lora
from c2a.plan.memory import Workload, optimizer_bytes, plan_memory
from c2a.train.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


@pytest.fixture
def torchao():
    return pytest.importorskip("torchao.optim", reason="torchao (pip install -e '.[adamw8bit]')")


def tiny_cfg(vocab: int = 256) -> LlamaConfig:
    """dim 64: wq, wo (64 x 64) and the FFN matrices (192 x 64) reach torchao's 4,096 values for 8 bits, wk and wv
    (32 x 64) stay fp32. (torchao's eager 8-bit update costs ~3 s of CPU per million values a step here.)"""
    return LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=64, max_seq_len=64)


def train_losses(optimizer: str, steps: int = 10) -> tuple[list[float], torch.optim.Optimizer]:
    """`steps` optimizer steps of the trainer's recipe pieces (build_optimizer, build_scheduler, clipping at 1.0,
    weight decay 0.1 on matrices) on two alternating batches."""
    torch.manual_seed(0)
    model = Llama(tiny_cfg())
    cfg = build_config({}, {"train.optimizer": optimizer, "train.weight_decay": "0.1", "train.lr": "3e-3"})
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, {"total_steps": steps, "warmup_steps": 1, "lr": 3e-3, "min_lr_ratio": 0.1})
    batches = [torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    losses = []
    for s in range(steps):
        ids = batches[s % 2]
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    return losses, opt


def test_losses_within_2_percent_of_adamw_over_10_steps(torchao):
    from torchao.optim.subclass_8bit import OptimState8bit

    reference, _ = train_losses("adamw")
    losses, opt = train_losses("adamw8bit")
    assert reference[-1] < 0.85 * reference[0], "the reference run must learn for the comparison to mean anything"
    for step, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= 0.02 * b, f"step {step}: adamw8bit {a:.4f}, adamw {b:.4f}"
    assert losses != reference  # the moments really were quantized
    eight_bit = sum(isinstance(s["exp_avg"], OptimState8bit) for s in opt.state.values())
    assert eight_bit == 2 * 5 + 2  # wq, wo, w1, w2, w3 of each block, the embedding and the output head


def test_weight_decay_and_groups_as_adamw(torchao):
    """With zero gradients the moments stay zero and AdamW only decays: p·(1 − lr·wd) on matrices, nothing on
    the norm weights (the trainer's no-decay group); the same as torch's AdamW to fp32 rounding."""
    out = {}
    for name in ("adamw", "adamw8bit"):
        cfg = build_config({}, {"train.optimizer": name, "train.weight_decay": "0.3", "train.lr": "0.1"})
        torch.manual_seed(0)
        model = Llama(tiny_cfg())
        model.norm.weight.data.mul_(1.5)
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        out[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    before = dict(Llama(tiny_cfg()).named_parameters())
    for n, p in out["adamw8bit"].items():
        torch.testing.assert_close(p, out["adamw"][n], rtol=1e-6, atol=0, msg=n)
        factor = 1.0 if p.dim() < 2 else 1 - 0.1 * 0.3
        torch.testing.assert_close(p, before[n].detach() * factor * (1.5 if n == "norm.weight" else 1), msg=n)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    from torchao.optim.subclass_8bit import OptimState8bit

    total = 0
    for state in opt.state.values():
        for t in state.values():
            parts = (t.codes, t.scale, t.qmap) if isinstance(t, OptimState8bit) else (t,)
            total += sum(x.numel() * x.element_size() for x in parts)
    return total


def test_state_bytes_as_the_planner_says(torchao):
    """A vocabulary of 257 rows makes the [257, 64] matrices a count that is not a multiple of 256: torchao
    keeps those, wk, wv and the norm weights in fp32; the planner must count both kinds."""
    cfg = tiny_cfg(vocab=257)
    model = Llama(cfg)
    opt = build_optimizer(model, build_config({}, {"train.optimizer": "adamw8bit"}), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    planned = optimizer_bytes(Workload(cfg, 1, 8, ranks=1, optimizer="adamw8bit"))
    assert state_bytes(opt) == planned
    eight_bit = sum(p.numel() for p in model.parameters() if p.numel() >= 4096 and p.numel() % 256 == 0)
    fp32 = sum(p.numel() for p in model.parameters()) - eight_bit
    assert eight_bit > fp32 and planned < 2.6 * eight_bit + 8 * fp32  # about 2, not 8, bytes a value


def test_plan_7b_full_fine_tune_with_adamw8bit_fits_one_80gb_card(plan_cli):  # noqa: F811
    """The card's 7B recipe on one 80 GB card without offload: AdamW needs 16 bytes a parameter (it does not
    fit), adamw8bit about 10. Optimizer state by torchao's rules: on one rank every one of the 291 tensors holds at
    least 4,096 values in whole blocks of 256 (the 65 norm weights exactly 4,096), so all are 8-bit: 2 + 8/256
    bytes a value, two 1 KiB maps and a 4-byte step a tensor."""
    one = plan_cli(
        "--config", "configs/claude2-alpaca-7b.toml", "--gpus", "1", "--gpu", "h100",
        "--train.optimizer=adamw8bit", "--train.cpu_offload=false",
    )  # fmt: skip
    p = one["per_rank_bytes"]
    assert p["optimizer"] == LLAMA2_7B * (2 + 8 / 256) + (9 * 32 + 3) * (2 * 1024 + 4)
    assert one["fits"] and p["peak"] <= 76 * GiB and one["workload"]["cpu_offload"] is False
    per_param = (p["params"] + p["grads"] + p["optimizer"]) / LLAMA2_7B
    assert 10 <= per_param < 10.1


def test_missing_torchao_is_one_line_before_anything_loads(tmp_path):
    """torchao hidden from the import system (where it is installed too): `error: ...` naming the extra, exit 1,
    and not even the out_dir made."""
    run = (
        "import runpy, sys; sys.modules['torchao'] = None; "
        f"sys.argv = ['c2a.train', '--out_dir={tmp_path / 'run'}', '--train.optimizer=adamw8bit']; "
        "runpy.run_module('c2a.train', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", run], capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ}
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["[c2a] error: train.optimizer = \"adamw8bit\" needs torchao: pip install -e '.[adamw8bit]'"]
    assert not (tmp_path / "run").exists()


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="train.optimizer must be adamw or adamw8bit"):
        build_config({}, {"train.optimizer": "adam8"})
    with pytest.raises(ValueError, match="adamw8bit keeps fp32 master weights"):
        build_config({}, {"train.optimizer": "adamw8bit", "train.master_dtype": "bf16"})


def test_trainer_runs_and_checkpoints_with_adamw8bit(torchao, tmp_path):
    """`python -m c2a.train --train.optimizer=adamw8bit` end to end in one process: the session builds the 8-bit
    optimizer, the schedule drives it, the checkpoint (with the scheduler's JSON state) and final/ are written."""
    out = tmp_path / "run"
    args = [
        "--train.optimizer=adamw8bit",
        "--train.max_steps=2",
        "--train.log_every=1",
        "--train.progress=false",
        "--data.demo_train_size=200",
        "--data.demo_heldout_size=8",
        "--eval.demo_accuracy=false",
    ]
    run_train(1, out, *args, tiny=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["lr"] > 0 for r in steps)
    assert (out / "checkpoints" / "step_00000002").is_dir() and (out / "final").is_dir()


def lora_losses(optimizer: str, steps: int = 10) -> tuple[list[float], torch.optim.Optimizer, Llama]:
    """train_losses' recipe on LoRA adapters of rank 64 on every linear of tiny_cfg: lora_A [64, 64] and lora_B
    [64 or 192, 64] reach torchao's 4,096 values for 8 bits, wk's and wv's lora_B [32, 64] stay fp32."""
    torch.manual_seed(0)
    model = apply_lora(Llama(tiny_cfg()), tuple(LORA_MODULES), rank=64, alpha=128)
    cfg = build_config({}, {"train.optimizer": optimizer, "train.weight_decay": "0.1", "train.lr": "1e-2"})
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, {"total_steps": steps, "warmup_steps": 1, "lr": 1e-2, "min_lr_ratio": 0.1})
    # one batch, learnt by heart: adapters around a random frozen base and head learn it 10% in 10 steps
    ids = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    return losses, opt, model


def test_lora_adapters_with_adamw8bit_train_as_adamw_and_size_as_planned(torchao):
    """LoRA with train.optimizer = adamw8bit: only the adapters have state, 8-bit where torchao quantizes, and
    exactly the planner's bytes; per-step losses within 2% of AdamW's on the same adapters."""
    from torchao.optim.subclass_8bit import OptimState8bit

    reference, _, _ = lora_losses("adamw")
    losses, opt, model = lora_losses("adamw8bit")
    assert reference[-1] < 0.92 * reference[0], "the reference run must learn for the comparison to mean anything"
    for step, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= 0.02 * b, f"step {step}: adamw8bit {a:.4f}, adamw {b:.4f}"
    assert losses != reference
    adapters = {p for n, p in model.named_parameters() if p.requires_grad}
    assert set(opt.state) == adapters and all("lora_" in n for n, p in model.named_parameters() if p in adapters)
    eight_bit = sum(isinstance(s["exp_avg"], OptimState8bit) for s in opt.state.values())
    assert eight_bit == 2 * (7 + 5)  # every lora_A, and every lora_B but wk's and wv's, in each of 2 blocks
    w = Workload(tiny_cfg(), 1, 8, ranks=1, optimizer="adamw8bit", lora_rank=64, lora_targets=tuple(LORA_MODULES))
    assert state_bytes(opt) == optimizer_bytes(w) == plan_memory(w).optimizer


def test_lora_trainer_with_adamw8bit_resumes_bitwise(torchao, tmp_path):
    """`python -m c2a.train --lora.rank=32 --train.optimizer=adamw8bit` (the demo model: lora_A [32, 192] and most
    lora_B are 8-bit) to step 4 with a checkpoint at 2; the same run cut back to step 2 and resumed gives the
    same losses at steps 3 and 4 and the same adapter, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [
        "--lora.rank=32",
        "--train.optimizer=adamw8bit",
        "--train.max_steps=4",
        "--train.save_every=2",
        "--train.log_every=1",
        "--train.progress=false",
        "--data.demo_train_size=300",
        "--data.demo_heldout_size=8",
        "--eval.demo_accuracy=false",
    ]

    def train(out: Path) -> str:
        return run_train(1, out, *args, tiny=False).stderr

    def losses(out: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}

    train(straight)
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("final", "step_00000004", "*.lock"))
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x).get("step", 0) <= 2))
    assert "step_00000002 (step 2 of 4" in train(resumed)  # "resumed from ...": not a fresh start
    assert len(losses(straight)) == 4 and losses(resumed) == losses(straight)
    a = load_file(straight / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
