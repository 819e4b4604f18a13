"""The training engine end to end: real torchrun, gloo, FSDP2 and DCP on CPU, on the bundled demo task."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from train_runs import (
    ROOT,
    TINY,
    checkpoint_tensors,
    loss_on_rows,
    metrics,
    run_train,
    step_rows,
    train_cmd,
    trainer_state,
)

from c2a.config import LlamaConfig, TrainConfig, build_config
from c2a.data import TokenizedDataset
from c2a.data.demo import DEMO_TOKENIZER, demo_split
from c2a.model import Llama, load_pretrained
from c2a.options import help_text, parse_args
from c2a.train.metrics import MetricsWriter
from c2a.train.optim import cosine_with_warmup


def demo_dataset() -> TokenizedDataset:
    """The TINY runs' training set, as the trainer builds it from data.path = "demo"."""
    return TokenizedDataset.from_records(demo_split(256, 16)[0], DEMO_TOKENIZER, 64)


def assert_export_is_the_trained_model(out: Path, tmp: Path) -> None:
    """final/ must hold the weights the run ended with, not merely weights c2a and transformers read alike:
    its loss on the last step's rows equals the last logged training loss, and is far below a random
    model's. Equal, not just close: the cosine schedule ends at lr 0, so the last step (whose loss was
    logged before its update) leaves the weights as they were; only the fp32 summation order differs."""
    last = metrics(out)[-1]
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert last["lr"] == 0.0 and trainer_state(ckpt)["step"] == last["step"]
    rows = step_rows(
        demo_dataset(), last["step"], trainer_state(ckpt)["data"]["global_batch_rows"], mode="packed", seq_len=64
    )
    exported = loss_on_rows(load_pretrained(out / "final", dtype=torch.float32), rows)
    torch.manual_seed(0)
    random = loss_on_rows(Llama(LlamaConfig.from_name("demo")), rows)
    assert exported == pytest.approx(last["loss"], rel=1e-5), (exported, last["loss"])
    assert exported < random - 1.0, (exported, random)


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def test_short_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_train(2, out, "--train.max_steps=12", "--train.lr=3e-3")
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in (
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "all_tokens_per_s",
        "padding_fraction",
        "peak_memory_mb",
    ):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # from ~log(512) = 6.2 it must clearly learn
    # warmup: ceil(3% of 12) = 1 step (at the full lr), then cosine from the full lr down to 0 at the last step
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == lrs[1] == pytest.approx(3e-3) and all(a > b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] == 0
    assert "c2a training finished" in proc.stdout
    # the run directory documents itself and its final export loads in transformers with c2a's logits
    assert build_config(__import__("tomllib").loads((out / "config.toml").read_text())).train.max_steps == 12
    final = out / "final"
    assert (final / "tokenizer.model").is_file() and (final / "config.json").is_file()
    ours = load_pretrained(final, dtype=torch.float32).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(final, attn_implementation="eager").eval()
    ids = torch.randint(3, ours.cfg.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    assert_export_is_the_trained_model(out, tmp_path)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children before grandchildren."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children += [int(c) for c in (task / "children").read_text().split()]
    return [d for c in children for d in (c, *_descendants(c))]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _kill_after_first_checkpoint(cmd: list[str], out: Path) -> None:
    """Starts the run and SIGKILLs its whole process group as soon as the first checkpoint is complete."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 240
    first = out / "checkpoints" / "step_00000004" / "trainer_state.json"
    while not first.exists():
        assert proc.poll() is None and time.time() < deadline, "run ended or stalled before its first checkpoint"
        time.sleep(0.02)
    # torchrun starts each worker in a session of its own, so killing torchrun's process group would leave
    # the ranks running (they would finish the run behind the test's back): SIGKILL every descendant
    victims = _descendants(proc.pid)
    for pid in [proc.pid, *victims]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in victims:  # reaped by init once their parent is gone; wait until they are
        while Path(f"/proc/{pid}").exists() and _state(pid) != "Z" and time.time() < deadline:
            time.sleep(0.02)
    assert not (out / "final").exists(), "the run finished before it could be killed; make it longer"


@pytest.mark.parametrize("resume_ranks", [2, 1], ids=["same-ranks", "fewer-ranks"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, resume_ranks):
    args = ["--train.max_steps=16", "--train.save_every=4", "--train.lr=3e-3"]
    run_train(2, tmp_path / "whole", *args)
    _kill_after_first_checkpoint(train_cmd(2, tmp_path / "killed", *args), tmp_path / "killed")
    proc = run_train(resume_ranks, tmp_path / "killed", *args)  # the same command again resumes
    assert "resumed from" in proc.stdout + proc.stderr and "step_00000004" in proc.stdout + proc.stderr
    whole, resumed = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for k in whole:
        if resume_ranks == 2:
            assert torch.equal(whole[k], resumed[k]), k  # bitwise: same ranks, same reduction order
        else:
            # another summation order; Adam divides by sqrt(v), so an element whose gradients are ~0 turns
            # that rounding into updates of up to lr-scale: 2 of 98k embedding entries differ by 2.5e-6
            torch.testing.assert_close(resumed[k], whole[k], rtol=1e-5, atol=1e-5, msg=k)
    # metrics continue across the restart: each step once (the killed run's records after its checkpoint,
    # which the resumed run repeats, are dropped), the same losses as the uninterrupted run
    resumed_rows, whole_rows = metrics(tmp_path / "killed"), metrics(tmp_path / "whole")
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in whole_rows] == list(range(1, 17))
    for a, b in zip(resumed_rows, whole_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=0 if resume_ranks == 2 else 1e-5), a["step"]
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == [
        "step_00000012",
        "step_00000016",
    ]  # keep_last
    assert_export_is_the_trained_model(tmp_path / "killed", tmp_path)


def test_non_finite_steps_are_skipped_then_stop_the_run_with_a_checkpoint(tmp_path):
    """lr 1e30: the first update blows the weights up, every later loss is non-finite; those updates are
    skipped (the weights stay as they were), and max_bad_steps of them in a row stop the run, exit 1, with a
    checkpoint to inspect."""
    out = tmp_path / "run"
    args = [
        "--train.max_steps=10",
        "--train.lr=1e30",
        "--train.max_bad_steps=3",
        "--train.save_every=1",
        "--train.keep_last=4",
    ]
    proc = subprocess.run(
        train_cmd(1, out, *args),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 non-finite steps in a row (train.max_bad_steps=3); stopped at step 4" in proc.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and math.isfinite(rows[0]["loss"])
    assert [r["loss"] for r in rows[1:]] == [None] * 3 and rows[-1]["skipped_steps"] == 3  # null in JSON, not NaN
    assert (out / "checkpoints" / "step_00000004" / "trainer_state.json").is_file() and not (out / "final").exists()
    # the stop's checkpoint holds the weights of the last good step (1), finite, with its optimizer state:
    # the skipped updates moved nothing (an update from a NaN gradient would have made them NaN)
    good, stopped = (checkpoint_tensors(out / "checkpoints" / f"step_{s:08d}", tmp_path) for s in (1, 4))
    assert good["model"].keys() == stopped["model"].keys()
    for name, w in stopped["model"].items():
        assert torch.isfinite(w).all() and torch.equal(w, good["model"][name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(stopped["optim"]["state"][name][key], good["optim"]["state"][name][key]), (name, key)


def test_metrics_of_steps_after_the_resumed_checkpoint_are_dropped(tmp_path):
    """A run killed at step 7 after its checkpoint at step 4 logged steps 5-7, which the resumed run logs
    again: the file keeps steps 1-4 and continues from there."""
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8))
    )
    writer = MetricsWriter(tmp_path, tensorboard=False, after_step=4)
    writer.write({"step": 5, "loss": 0.5})
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5] and metrics(tmp_path)[-1]["loss"] == 0.5
    MetricsWriter(tmp_path, tensorboard=False, after_step=5)  # nothing to drop: the file is left as it is
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_gradients_independent_of_split(tmp_path, mode):
    """1 rank x 4 micro-batches, 2 x 2, 4 x 1, activation checkpointing (full when padded, selective on every
    2nd block when packed: one run each keeps the test's time), HSDP (2 replicas x 2 shards): the same loss
    and gradients."""
    results = {}
    checkpointed = "full" if mode == "padded" else "selective"
    splits = [
        (1, 1, "none", 1),
        (2, 1, "none", 1),
        (4, 1, "none", 1),
        (1, 4, "none", 1),
        (2, 1, checkpointed, 1),
        (4, 1, "none", 2),
    ]
    for ranks, micro, ac, replicas in splits:
        out = tmp_path / f"{ranks}x{micro}-{ac}-{replicas}.pt"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            str(ROOT / "tests" / "dist_step.py"),
            str(out),
            str(micro),
            mode,
            ac,
            str(replicas),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[(ranks, micro, ac, replicas)] = torch.load(out)
    ref = results[(1, 1, "none", 1)]
    assert ref["accum"] == 4 and ref["targets"] > 0
    # activation checkpointing really wraps the blocks it names: a wrapped block's attention runs again in
    # the backward (the demo model has 4 blocks; selective with ac_every=2 wraps blocks 0 and 2)
    runs = {"none": [1, 1, 1, 1], "full": [2, 2, 2, 2], "selective": [2, 1, 2, 1]}
    for (ranks, micro, ac, replicas), r in results.items():
        assert r["attention_calls"] == [r["accum"] * n for n in runs[ac]], (ranks, micro, ac, replicas)
        # the model gather_model copies out of the shards (the demo evaluation's) computes what they compute
        torch.testing.assert_close(r["gathered_loss_sum"], r["sharded_loss_sum"], rtol=1e-6, atol=0)
    for key, r in results.items():
        torch.testing.assert_close(r["loss"], ref["loss"], rtol=1e-6, atol=0, msg=str(key))
        for name, g in r["grads"].items():
            want = ref["grads"][name]  # fp32 sums in another order: rounding at 1e-6 of the tensor's scale
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6 * want.abs().max().item(), msg=f"{key} {name}")


def test_schedule_spans_the_real_number_of_steps(tmp_path):
    out = tmp_path / "run"
    proc = run_train(1, out, "--train.epochs=2", "--train.warmup_ratio=0.25", "--train.lr=1e-3")
    rows = metrics(out)
    logged = next(line for line in proc.stderr.splitlines() if "schedule:" in line)
    total = int(logged.split("schedule:")[1].split()[0])
    assert [r["step"] for r in rows] == list(range(1, total + 1))  # the data ran out exactly at the last step
    warmup = math.ceil(0.25 * total)
    lrs = [r["lr"] for r in rows]
    assert lrs[warmup - 1] == pytest.approx(1e-3)  # peak right after warmup
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cosine reaches its end at the last real step
    assert all(a < b for a, b in zip(lrs[: warmup - 1], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup - 1 :], lrs[warmup:]))
    assert {r["epoch"] for r in rows} == {1, 2}
    # and the run consumed exactly the two epochs: every trained target of the data set twice, no more
    # (a schedule shorter than the data would leave some untrained), no fewer (nor a third epoch begun)
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("tokens "))
    trained = int(summary.split("(")[1].split()[0].replace(",", ""))
    assert trained == 2 * int((demo_dataset().labels != -100).sum()), summary


def test_cosine_with_warmup_shape():
    f = cosine_with_warmup(total_steps=100, warmup_steps=3, min_ratio=0.1)
    assert [f(0), f(1), f(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(3) == pytest.approx(1.0) and f(99) == pytest.approx(0.1)
    assert f(51) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-2)


def test_bad_configs_give_clear_errors(tmp_path):
    with pytest.raises(KeyError, match=r"unknown option --train.learning_rate; did you mean train.lr\?"):
        parse_args(["--train.learning_rate=1"])
    with pytest.raises(KeyError, match=r"unknown option --train.lrr; did you mean train.lr or "):
        parse_args(["--train.lrr=1"])
    with pytest.raises(ValueError, match=r"train.grad_clip and train.weight_decay must be >= 0"):
        parse_args(["--train.grad_clip=-1"])
    with pytest.raises(ValueError, match="config key train.max_steps expects int, got 'ten'"):
        parse_args(["--train.max_steps", "ten"])
    with pytest.raises(ValueError, match="train.activation_checkpointing must be none, full, selective, first or auto"):
        parse_args(["--train.activation_checkpointing=some"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = 1e-5\nbatch = 3\n")
    with pytest.raises(KeyError, match=f"{bad}: unknown key 'train.batch'"):
        parse_args(["--config", str(bad)])
    bad.write_text("[train]\nepochs = 'five'\n")
    with pytest.raises(ValueError, match=f"{bad}: config key train.epochs expects int, got str 'five'"):
        parse_args([f"--config={bad}"])
    assert "--train.save_every" in help_text() and "--out_dir" in help_text()
    # and through the real entry point: the message, a non-zero exit, no traceback
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "c2a.train",
            f"--out_dir={tmp_path / 'x'}",
            "--data.packing=false",
            "--train.global_batch=6",
            "--train.micro_batch=4",
            *TINY[:3],
            "--eval.demo_accuracy=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        "train.global_batch's 6 examples per step must be a multiple of train.micro_batch (4) x ranks (1); use --train.micro_batch=3"
        in proc.stderr
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "c2a.train",
            f"--out_dir={tmp_path / 'y'}",
            "--data.path=/nonexistent/alpaca.json",
            "--data.tokenizer=" + str(ROOT / "c2a/data/assets/demo_tokenizer.model"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "data file not found: /nonexistent/alpaca.json" in proc.stderr


def test_demo_toml_is_the_embedded_default():
    import tomllib

    assert build_config(tomllib.loads((ROOT / "configs" / "demo.toml").read_text())) == TrainConfig()
    for recipe in ("claude2-alpaca-7b", "claude2-alpaca-13b"):
        cfg = build_config(tomllib.loads((ROOT / "configs" / f"{recipe}.toml").read_text()))
        t = cfg.train
        # the model card: global batch 128, lr 1e-5, 5 epochs, max length 2048, weight decay 0, 3% warmup, clip 1.0, bf16
        assert (
            t.global_batch,
            t.lr,
            t.epochs,
            cfg.data.max_len,
            t.weight_decay,
            t.warmup_ratio,
            t.grad_clip,
            t.dtype,
        ) == (128, 1e-5, 5, 2048, 0.0, 0.03, 1.0, "bf16")


GOLDEN = ROOT / "tests" / "golden" / "demo_loss_first_20_steps.json"


def test_golden_demo_loss_curve(tmp_path):
    """The embedded demo default's first 20 optimizer steps (one process, so no rank split can blur them)
    must reproduce the recorded losses: any change to data order, tokenization, init, the model, the loss
    normalisation or the schedule moves them. Regenerate with tests/golden/make_golden.py only for an
    intended change, and say so in the commit."""
    out = tmp_path / "golden"
    run_train_default(out, "--train.max_steps=20", "--train.log_every=1", "--eval.demo_accuracy=false")
    losses = [r["loss"] for r in metrics(out)]
    golden = json.loads(GOLDEN.read_text())["loss"]
    assert len(losses) == len(golden) == 20
    # fp32 on another CPU may round differently in its BLAS; 20 Adam steps keep that far below 1e-3
    assert losses == pytest.approx(golden, rel=1e-3)
    assert golden[-1] < golden[0] - 2.0  # and the recorded curve itself shows learning


def run_train_default(out: Path, *args: str) -> subprocess.CompletedProcess:
    """The embedded default (no TINY overrides) in one process."""
    proc = subprocess.run(
        [sys.executable, "-m", "c2a.train", f"--out_dir={out}", "--train.progress=false", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
