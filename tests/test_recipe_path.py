"""The claude2-alpaca recipe's own path, on 2 gloo ranks with tiny models: fine-tuning from an HF checkpoint
that transformers saved (tokenizer taken from its directory) on an Alpaca-format file tokenized by rank 0
into out_dir/data_cache; a cache prepared by `python -m c2a.data.prepare`; bf16 mixed precision; a step
without trained targets; the demo exact-match evaluation across a resume with partial checkpoints left
behind; torch.compile.

The oracle for "the weights were loaded" is the checkpoint's own loss on the exact rows of step 1; for "the
export is the trained model", its loss on the rows of the last step (the schedule ends at lr 0, so the last
update changes nothing) and transformers' logits on the exported directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from train_runs import ROOT, checkpoint_tensors, loss_on_rows, metrics, run_train, step_rows, trainer_state

from c2a.data import TokenizedDataset, Tokenizer
from c2a.data.demo import DEMO_TOKENIZER, demo_split
from c2a.inference import answers, demo_exact_match
from c2a.model import Llama, load_pretrained

# Each optimizer step: 16 examples' worth of 64-token packed rows, one row per micro-batch on each rank.
RUN = [
    "--data.max_len=64",
    "--train.micro_batch=1",
    "--train.global_batch=16",
    "--train.progress=false",
    "--train.log_every=1",
]
# The model card's command (its TOML: packing, AdamW betas, warmup, clipping, bf16, full AC) made tiny; fp32
# here so that step 1's loss is exactly the checkpoint's (bf16 has its own test), selective AC every 2 blocks.
RECIPE = [f"--config={ROOT / 'configs' / 'claude2-alpaca-13b.toml'}", *RUN]
FINETUNE = [
    "--train.max_steps=4",
    "--train.lr=1e-3",
    "--train.dtype=fp32",
    "--train.activation_checkpointing=selective",
    "--train.ac_every=2",
]


def _hf_checkpoint(path: Path, vocab_size: int, tokenizer: bool = True) -> Path:
    """A tiny Llama saved by transformers itself. 3 layers, so selective checkpointing with ac_every=2 wraps
    some blocks (0 and 2) and not others; init std 0.1 (not 0.02) so its loss (6.7 on step 1's rows) is far
    from a freshly initialised model's (~ln 520 = 6.25) and a run that ignored the weights cannot match it."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    if tokenizer:
        shutil.copyfile(DEMO_TOKENIZER, path / "tokenizer.model")  # 512 pieces <= vocab_size
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipe")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    return _hf_checkpoint(work / "Llama-tiny-hf", vocab_size=520)


@pytest.fixture(scope="module")
def alpaca_file(work) -> Path:
    """96 Alpaca-format records (instruction / input / output), as JSON lines."""
    records = demo_split(96, 4, seed=1)[0]
    path = work / "alpaca.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def finetune(work, ckpt, alpaca_file) -> tuple[Path, subprocess.CompletedProcess]:
    """The recipe's command in small: --config claude2-alpaca-13b.toml --model.checkpoint=DIR --data.path=FILE."""
    out = work / "finetune"
    proc = run_train(2, out, *RECIPE, f"--model.checkpoint={ckpt}", f"--data.path={alpaca_file}", *FINETUNE, tiny=False)
    return out, proc


def _rows(out: Path, step: int, data: Path | None = None, mode: str = "packed") -> list:
    """The rows of `step` of the run in `out`, from its data (default: the cache it tokenized)."""
    dataset = TokenizedDataset.open(data or out / "data_cache")
    global_rows = trainer_state(sorted((out / "checkpoints").iterdir())[-1])["data"]["global_batch_rows"]
    return step_rows(dataset, step, global_rows, mode=mode, seq_len=64)


def _assert_logits_match_transformers(final: Path, atol: float) -> None:
    ours = load_pretrained(final, dtype=torch.float32).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(final, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.randint(3, ours.cfg.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=atol, atol=atol)


# ------------------------------------------------------------------------------ fine-tuning from weights


def test_finetune_starts_from_the_checkpoint_weights(finetune, ckpt):
    out, proc = finetune
    assert f"pretrained {ckpt}" in proc.stderr
    step1 = metrics(out)[0]
    rows = _rows(out, 1)
    source = loss_on_rows(load_pretrained(ckpt, dtype=torch.float32), rows)
    torch.manual_seed(0)
    fresh = loss_on_rows(Llama(load_pretrained(ckpt).cfg), rows)
    # 2 ranks x 3 micro-batches summed in another order than here: fp32 rounding only
    assert step1["loss"] == pytest.approx(source, rel=1e-5), (step1["loss"], source)
    assert abs(source - fresh) > 0.2  # so the match above cannot be a coincidence of two random models


def test_finetune_export_is_trained_and_loads_in_transformers(finetune, ckpt):
    out, _ = finetune
    final = out / "final"
    assert (final / "tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()
    assert json.loads((final / "config.json").read_text())["vocab_size"] == 520
    before, after = load_file(ckpt / "model.safetensors"), load_file(final / "model.safetensors")
    assert after.keys() == before.keys()
    for name in after:  # every tensor was trained (norm weights included: lr 1e-3 moves them at step 1)
        assert not torch.equal(after[name], before[name]), name
    _assert_logits_match_transformers(final, atol=1e-4)
    last = metrics(out)[-1]
    assert last["step"] == 4 and last["lr"] == 0.0
    exported = loss_on_rows(load_pretrained(final, dtype=torch.float32), _rows(out, 4))
    assert exported == pytest.approx(last["loss"], rel=1e-5)
    assert exported < metrics(out)[0]["loss"] - 0.5  # and it learned from the checkpoint's starting point


def test_data_file_tokenized_once_then_checked_on_resume(finetune, ckpt, alpaca_file, tmp_path):
    out, proc = finetune
    assert proc.stderr.count("tokenizing ") == 1  # rank 0 only; rank 1 waited at the barrier, then mapped the cache
    manifest = json.loads((out / "data_cache" / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(alpaca_file.read_bytes()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((ckpt / "tokenizer.model").read_bytes()).hexdigest()
    assert manifest["counts"]["examples"] == 96 and manifest["max_len"] == 64
    # the same run directory, its data file since edited: a clear error, not training on stale tokens
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    edited = tmp_path / "alpaca.jsonl"
    edited.write_text(alpaca_file.read_text().replace('"output": "', '"output": "edited ', 1))
    proc = run_train(
        1, resumed, *RECIPE, f"--model.checkpoint={ckpt}", f"--data.path={edited}", *FINETUNE, tiny=False, expect=1
    )
    assert "Traceback" not in proc.stderr and "resumed from" not in proc.stderr
    assert re.search(
        rf"tokenized cache {resumed / 'data_cache'} does not match this run: source file sha256 is \w+\.\.\. "
        rf"\({alpaca_file}\), expected \w+\.\.\. \({edited}\)",
        proc.stderr,
    ), proc.stderr[-2000:]


def test_tokenizer_and_vocab_checks(work, alpaca_file, tmp_path):
    small = _hf_checkpoint(tmp_path / "small-vocab", vocab_size=300)
    proc = run_train(
        1, tmp_path / "a", *RUN, f"--model.checkpoint={small}", f"--data.path={alpaca_file}", tiny=False, expect=1
    )
    assert f"tokenizer {small / 'tokenizer.model'} has 512 pieces but the model's vocab_size is 300" in proc.stderr
    bare = _hf_checkpoint(tmp_path / "no-tokenizer", vocab_size=520, tokenizer=False)
    proc = run_train(
        1, tmp_path / "b", *RUN, f"--model.checkpoint={bare}", f"--data.path={alpaca_file}", tiny=False, expect=1
    )
    assert "no tokenizer: set data.tokenizer" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------- prepared cache, bf16, no targets


def test_prepared_cache_in_bf16(finetune, ckpt, alpaca_file, tmp_path):
    """The recipe's command on data.path = a directory from `python -m c2a.data.prepare`, in its dtype, bf16
    (FSDP2 mixed precision: bf16 compute and all-gathers, fp32 master weights and gradient reduction), with
    full activation checkpointing, on gloo."""
    cache = tmp_path / "cache"
    prep = subprocess.run(
        [
            sys.executable,
            "-m",
            "c2a.data.prepare",
            "--data",
            str(alpaca_file),
            "--tokenizer",
            str(ckpt / "tokenizer.model"),
            "--out",
            str(cache),
            "--max-len",
            "64",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert prep.returncode == 0, prep.stderr
    out = tmp_path / "run"
    run_train(
        2,
        out,
        *RECIPE,
        f"--model.checkpoint={ckpt}",
        f"--data.path={cache}",
        "--train.max_steps=3",
        "--train.lr=1e-3",
        tiny=False,
    )
    assert 'dtype = "bf16"' in (out / "config.toml").read_text()  # the recipe's own
    assert not (out / "data_cache").exists()  # the prepared cache was used as it is
    rows = metrics(out)
    fp32 = loss_on_rows(load_pretrained(ckpt, dtype=torch.float32), _rows(out, 1, data=cache))
    assert fp32 == pytest.approx(metrics(finetune[0])[0]["loss"], rel=1e-5)  # the same rows as from the file
    # computed in bf16 (8 mantissa bits): near the fp32 loss, but not it
    assert rows[0]["loss"] == pytest.approx(fp32, rel=2e-2) and rows[0]["loss"] != pytest.approx(fp32, rel=1e-5)
    assert all(r["loss"] is not None and r["grad_norm"] > 0 for r in rows)
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.bfloat16}
    _assert_logits_match_transformers(final, atol=1e-4)


def test_step_without_trained_targets_changes_nothing(ckpt, alpaca_file, tmp_path):
    """A cache whose step 2 has no trained target at all (every label -100): the step runs, but no update
    is applied (AdamW's momentum from step 1 alone would move every weight), its loss is logged as null
    (not 0, which would read as a perfect model), and step 3 trains again."""
    tok = Tokenizer(ckpt / "tokenizer.model")
    records = [json.loads(line) for line in alpaca_file.read_text().splitlines()]
    ds = TokenizedDataset.from_records(records, tok, 64)
    labels = ds.labels.copy()
    for mb in step_rows(ds, 2, 4, mode="padded", seq_len=64):  # padded: one example per row
        ids = mb.input_ids[0, : mb.num_tokens].numpy()
        same = [i for i in range(len(ds)) if len(ds[i][0]) == len(ids) and (ds[i][0] == ids).all()]
        assert same
        for i in same:
            labels[ds.offsets[i] : ds.offsets[i + 1]] = -100
    cache = TokenizedDataset(ds.input_ids, labels, ds.offsets, ds.manifest).save(tmp_path / "cache")
    out = tmp_path / "run"
    run_train(
        2,
        out,
        *RUN,
        "--train.global_batch=4",
        "--data.packing=false",
        f"--model.checkpoint={ckpt}",
        f"--data.path={cache}",
        "--train.max_steps=4",
        "--train.save_every=1",
        "--train.keep_last=4",
        "--train.lr=1e-3",
        tiny=False,
    )
    rows = metrics(out)  # (4 steps: the last one's lr is 0)
    assert [r["loss"] is None for r in rows] == [False, True, False, False] and rows[1]["grad_norm"] == 0.0
    one, two, three = (checkpoint_tensors(out / "checkpoints" / f"step_{s:08d}", tmp_path) for s in (1, 2, 3))
    for name, w in two["model"].items():
        assert torch.equal(w, one["model"][name]), name
        assert torch.equal(two["optim"]["state"][name]["exp_avg"], one["optim"]["state"][name]["exp_avg"]), name
        assert not torch.equal(three["model"][name], w), name


# ---------------------------------------------------------------- demo evaluation, resume, partial saves


def _demo_summary(stdout: str) -> list[str]:
    """The closing summary's exact-match lines (before -> after, per task)."""
    return [line for line in stdout.splitlines() if line.startswith(("demo exact match", "  per task:"))]


def test_demo_evaluation_across_a_resume_with_partial_checkpoints(tmp_path):
    """The default command's headline: held-out exact match before and after (evaluate_demo on the model
    gathered by gather_model; tests/dist_step.py checks the gathered model's loss), in the summary. A run
    that crashed after its step-2 checkpoint, leaving a torn save (.tmp) and a step directory without DCP's
    .metadata (a keep_last removal cut short), resumes from step 2, removes both, keeps the 'before' it
    measured at the start (not re-measured on trained weights) and ends exactly as the uninterrupted run."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [
        "--eval.demo_accuracy=true",
        "--eval.max_examples=12",
        "--eval.max_new_tokens=8",
        "--train.max_steps=4",
        "--train.save_every=2",
        "--train.lr=3e-3",
    ]
    first = run_train(2, out, *args)
    assert (
        first.stderr.count("demo held-out exact match before training") == 1
        and "exact match after training" in first.stderr
    )
    summary = _demo_summary(first.stdout)
    assert len(summary) == 2 and summary[0].endswith("(12 held-out examples, greedy)"), first.stdout
    before = trainer_state(ckpts / "step_00000002")["counters"]["demo_before"]
    assert before["examples"] == 12 and summary[0].startswith(
        f"demo exact match before {100 * before['accuracy']:.1f}% -> after "
    )
    # 'after' is what c2a.eval's functions give on the exported model (4 steps score little, so the gathered
    # copy's weights are checked by its loss in tests/dist_step.py)
    heldout = demo_split(256, 16)[1][:12]
    model = load_pretrained(out / "final", dtype=torch.float32).eval()
    after = demo_exact_match(heldout, answers(model, Tokenizer(DEMO_TOKENIZER), heldout, 8, batch_size=12))
    assert summary[0].endswith(f"-> after {100 * after['accuracy']:.1f}% (12 held-out examples, greedy)")
    assert summary[1] == "  per task: " + ", ".join(
        f"{k} {100 * v['accuracy']:.0f}%" for k, v in after["per_task"].items()
    )

    # the crash: no final/, no step-4 checkpoint; a torn save and a directory without .metadata left behind
    uninterrupted = load_file(out / "final" / "model.safetensors")
    shutil.rmtree(out / "final")
    shutil.rmtree(ckpts / "step_00000004")
    torn = ckpts / "step_00000005.tmp"
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"cut short")
    no_metadata = shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000003")
    (no_metadata / ".metadata").unlink()
    (no_metadata / "trainer_state.json").write_text(json.dumps({**trainer_state(no_metadata), "step": 3}))
    second = run_train(2, out, *args)  # the same command again
    assert f"resumed from {ckpts / 'step_00000002'}" in second.stderr, second.stderr[-3000:]
    assert not torn.exists() and not no_metadata.exists()
    assert "exact match before training" not in second.stderr  # kept from the checkpoint, not re-measured
    assert _demo_summary(second.stdout) == summary
    resumed = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


# ------------------------------------------------------------------------------------------- compile


def test_compile_trains_the_same_step(ckpt, alpaca_file, tmp_path):
    """train.compile: each block compiled by torch.compile. On CPU a packed run recompiles for every new
    document layout (about 100 s a step, measured), so this is 1 rank, 1 step of one padded example: 24 s
    of CPU with a cold inductor cache (63-70 s wall on the 2-core machine at load 5-7), 8 s warm. The
    compiled step gives the eager loss of that row."""
    out = tmp_path / "run"
    proc = run_train(
        1,
        out,
        *RUN,
        "--train.global_batch=1",
        "--data.packing=false",
        f"--model.checkpoint={ckpt}",
        f"--data.path={alpaca_file}",
        "--train.max_steps=1",
        "--train.compile=true",
        tiny=False,
        env={"TORCH_LOGS": "dynamo"},
    )
    # dynamo traced the transformer block's forward (each block is compiled; nothing else is)
    assert re.search(r"torchdynamo start tracing forward \S*c2a/model/llama\.py", proc.stderr), proc.stderr[-3000:]
    step1 = metrics(out)[0]
    eager = loss_on_rows(load_pretrained(ckpt, dtype=torch.float32), _rows(out, 1, mode="padded"))
    assert step1["loss"] == pytest.approx(eager, rel=1e-4)
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(not torch.equal(after[k], before[k]) for k in before)  # and the step's update was applied
