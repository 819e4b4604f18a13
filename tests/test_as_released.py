"""The as-released recipe: each way the released claude2-alpaca model's training differed from its card,
as a setting, checked against a reference of the facts written here (not the library's code) with
transformers and sentencepiece as oracles.

Facts (the released train.py / dataset.py / train.sh, read 2026-12-06): micro-batches of one example whose
mean loss is divided by the accumulation steps and averaged over ranks (a per-example mean);
transformers' get_cosine_schedule_with_warmup with int(steps * 0.03) warmup steps and a horizon fixed
before the real step count was known.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_weighting import GLOBAL_ROWS, MODEL, loader
from kernel_checks import DEVICE, DTYPES, assert_within_torch_error

from c2a.config import build_config
from c2a.data import TokenizedDataset, Tokenizer
from c2a.kernels.cross_entropy import (
    IGNORE_INDEX,
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)
from c2a.model import Llama, save_pretrained
from c2a.train.optim import build_scheduler, schedule_of
from c2a.train.parallel import materialize

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ loss weighting: the kernel's row weights


def _weighted_problem(N: int, D: int, V: int, dtype: torch.dtype):
    h = torch.randn(N, D, device=DEVICE).to(dtype)
    w = (torch.randn(V, D, device=DEVICE) * 2 / D**0.5).to(dtype)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.rand(N, device=DEVICE) < 0.3] = IGNORE_INDEX
    weights = torch.rand(N, device=DEVICE) + 0.05  # 1 / an example's target count, in (0, 1]
    return h, w, labels, weights


def _loss_and_grads(fn, h, w, labels, **kwargs):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(h, w, labels, **kwargs)
    loss.backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, D, V, chunk", [(37, 24, 203, 8), (13, 16, 1000, 5)])
def test_row_weights_in_the_fused_cross_entropy_match_float64(dtype, N, D, V, chunk):
    """loss = Σ w_t CE_t / n and both gradients, Triton (the interpreter on CPU) and torch's chunked path,
    against the float64 reference (itself checked against a plain weighted sum of per-row cross-entropies)."""
    h, w, labels, weights = _weighted_problem(N, D, V, dtype)
    n = torch.tensor(7.0)
    kw = {"normalizer": n, "weights": weights}
    got = _loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=chunk, **kw)
    ref_t = _loss_and_grads(linear_cross_entropy_reference, h, w, labels, **kw)
    ref64 = _loss_and_grads(linear_cross_entropy_reference, h.double(), w.double(), labels, **kw)
    for name, a, b, c in zip(("loss", "dh", "dW"), got, ref_t, ref64):
        assert_within_torch_error(name, a, b, c)
    plain = (F.cross_entropy(h.double() @ w.double().T, labels, reduction="none") * weights.double()).sum() / 7
    torch.testing.assert_close(ref64[0], plain)
    if dtype == torch.float32:
        chunked = _loss_and_grads(linear_cross_entropy_chunked, h, w, labels, **kw)
        for a, c in zip(chunked, ref64):
            torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-6)
    # and the weights matter: all-ones weights give another loss
    assert not torch.allclose(got[0], linear_cross_entropy(h, w, labels, n, weights=torch.ones_like(weights)))


def test_weighted_model_loss_is_the_same_with_either_row_selection():
    """Llama.loss(weights=) keeps each weight with its row through both trained-row selections (the host one,
    and the sync-free sort used when the loader passes num_trained) and equals the plain weighted sum."""
    from c2a.train.weighting import example_weights

    model = Llama(MODEL)
    ids = torch.randint(3, MODEL.vocab_size, (2, 19))
    labels = torch.randint(3, MODEL.vocab_size, (2, 19))
    labels[0, :4] = labels[1, 7:9] = -100
    pos = torch.cat([torch.arange(8), torch.arange(11)]).expand(2, 19)  # two documents a row
    weights, examples = example_weights(labels, pos)
    assert examples.item() == 4 and weights[0, :8].sum().item() == pytest.approx(1.0)
    host = model.loss(ids, labels, pos, normalizer=4.0, weights=weights)
    sorted_rows = model.loss(ids, labels, pos, normalizer=4.0, weights=weights, num_trained=int((labels != -100).sum()))
    with torch.no_grad():
        rows = F.cross_entropy(model(ids, pos).flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(host, (rows * weights.flatten()).sum() / 4)
    torch.testing.assert_close(sorted_rows, host)


# ------------------------------------------------------------------ loss weighting: a step on 1 and 2 ranks


def _run_weighting_launch(ranks: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd += [str(ROOT / "tests" / "dist_weighting.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def _per_example_mean(hf, mode: str) -> float:
    """The released training's loss for step 1's examples: each example's mean cross-entropy over its own
    trained targets (HF's logits, one example per forward), then the mean over examples."""
    ld = loader(mode, GLOBAL_ROWS, 0, 1)
    rows = ld._epoch_rows(0)[:GLOBAL_ROWS]  # the step's rows (the same for every split)
    means = []
    for ex in (int(i) for row in rows for i in row):
        x, y = ld.dataset[ex]
        with torch.no_grad():
            logits = hf(input_ids=torch.as_tensor(x)[None]).logits[0].double()
        means.append(F.cross_entropy(logits, torch.as_tensor(y), ignore_index=-100).item())
    return sum(means) / len(means)


def test_example_weighting_is_the_per_example_mean_on_one_and_two_ranks(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = Llama(MODEL)
    materialize(model, None, seed=0)  # the weights every launch builds (identical for any rank count)
    save_pretrained(model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    results = {1: _run_weighting_launch(1, tmp_path / "r1.pt"), 2: _run_weighting_launch(2, tmp_path / "r2.pt")}
    for mode in ("packed", "padded"):
        want = _per_example_mean(hf, mode)
        base = results[1][(mode, 1)]
        for ranks, res in results.items():
            for micro in (1, 2):
                r = res[(mode, micro)]
                assert r["loss"].item() == pytest.approx(want, rel=2e-6), (mode, ranks, micro)
                for name, g in r["grads"].items():  # invariant to how the step is split
                    ref = base["grads"][name]
                    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
        # the per-token mean of the same step is another number: the test can tell them apart
        # the per-token mean of the same step is another number, far outside the tolerance (an untrained model's
        # losses are all near log V, so the two differ by 2e-4 relative packed, 2e-3 padded)
        assert abs(_per_token_mean(hf, mode) - want) > 50 * 2e-6 * want


def _per_token_mean(hf, mode: str) -> float:
    ld = loader(mode, GLOBAL_ROWS, 0, 1)
    total, count = 0.0, 0
    for ex in (int(i) for row in ld._epoch_rows(0)[:GLOBAL_ROWS] for i in row):
        x, y = ld.dataset[ex]
        with torch.no_grad():
            logits = hf(input_ids=torch.as_tensor(x)[None]).logits[0].double()
        y = torch.as_tensor(y)
        total += F.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    return total / count


# ------------------------------------------------------------------ the schedule: transformers' cosine


@pytest.mark.parametrize(
    "rounding, total, horizon",
    [("floor", 150, 0), ("ceil", 150, 0), ("floor", 2030, 1218)],  # 2030 = 5 epochs of 52002 at batch 128
)
@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_hf_schedule_equals_transformers_at_every_step(rounding, total, horizon):
    transformers = pytest.importorskip("transformers")
    cfg = build_config(
        {
            "train": {
                "lr": 2e-5,
                "warmup_ratio": 0.03,
                "lr_schedule": "hf",
                "warmup_rounding": rounding,
                "schedule_steps": horizon,
            }
        }
    )
    span = horizon or total
    warmup = math.ceil(0.03 * span) if rounding == "ceil" else int(0.03 * span)  # the released script: int()
    params = [torch.nn.Parameter(torch.zeros(1))]
    ours = build_scheduler(torch.optim.AdamW(params, lr=2e-5), schedule_of(cfg, total))
    theirs = transformers.get_cosine_schedule_with_warmup(torch.optim.AdamW(params, lr=2e-5), warmup, span)
    lrs, want = [], []
    for _ in range(total):
        lrs.append(ours.get_last_lr()[0])
        want.append(theirs.get_last_lr()[0])
        ours.step()
        theirs.step()
    assert lrs == want
    assert lrs[0] == 0.0 or warmup == 0
    if horizon:  # past the fixed horizon the lr rises again: transformers does not clamp
        assert lrs[-1] > lrs[horizon]


# ------------------------------------------------------------------ the template and the joint tokenization

# Stanford Alpaca's two prompts, written out here again (the released script used them, choosing by the
# instruction)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
RELEASED_MAX_LENGTH = 1024  # the tokenizer's model_max_length: tokens fed to the model, BOS and EOS included

RECORDS = [
    {"instruction": "Name three primary colours.", "input": "", "output": "Red, yellow and blue."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "", "input": "an input without an instruction", "output": "It is ignored by the prompt."},
    {"instruction": "", "input": "", "output": "Nothing was asked."},
    {"instruction": "Écris un haïku 🌸", "input": "日本語のテキスト", "output": "Sakura — 桜 — ☀️ naïve café."},
    {"instruction": "Tell a long story.", "input": "", "output": " ".join(f"word{i}" for i in range(1500))},
    {"instruction": "Repeat.", "input": "x " * 1100, "output": "done"},  # the prompt alone is past 1024
]


def _released_encoding(sp, record: dict) -> tuple[list[int], list[int]] | None:
    """The released dataset.py's example, from the facts: the prompt chosen by the instruction, one
    tokenization of prompt + response + "</s>" (the slow tokenizer: BOS, SentencePiece's pieces, EOS id 2),
    the first len(tokenize(prompt)) positions masked, cut on the right at 1024 tokens. Returned in c2a's
    convention (input_ids = tokens[:-1], labels = the next tokens); None when no target is left."""
    prompt = (WITH_INPUT if record["instruction"] != "" else NO_INPUT).format(**record)
    full = ([sp.bos_id()] + sp.encode(prompt + record["output"]) + [sp.eos_id()])[:RELEASED_MAX_LENGTH]
    n_prompt = len([sp.bos_id()] + sp.encode(prompt))
    labels = [-100 if i < n_prompt else t for i, t in enumerate(full)]  # HF's convention: labels = input_ids
    if all(label == -100 for label in labels[1:]):
        return None
    return full[:-1], labels[1:]


def test_released_template_and_joint_tokenization_match_the_reference(real_tokenizer_path):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_path))
    ds = TokenizedDataset.from_records(
        RECORDS,
        Tokenizer(real_tokenizer_path),
        RELEASED_MAX_LENGTH - 1,  # c2a's max_len counts input positions: tokens - 1
        truncation="right",
        template="alpaca-claude2-released",
        tokenization="joint",
    )
    want = [e for e in (_released_encoding(sp, r) for r in RECORDS) if e is not None]
    assert len(want) == len(RECORDS) - 1 and len(ds) == len(want)  # the prompt-only record is dropped
    for i, (ids, labels) in enumerate(want):
        got_ids, got_labels = ds[i]
        assert got_ids.tolist() == ids, RECORDS[i]
        assert got_labels.tolist() == labels, RECORDS[i]
    long = ds[5]  # the long response: cut at 1024 tokens, its EOS lost
    assert len(long[0]) == RELEASED_MAX_LENGTH - 1 and long[1][-1] != sp.eos_id()
    assert ds.manifest["alpaca_encoding"] == {"template": "alpaca-claude2-released", "tokenization": "joint"}
    assert ds.manifest["counts"]["truncated"] == 1 and ds.manifest["counts"]["dropped"] == 1


def test_released_chat_template_gives_the_alpaca_records_encoding(real_tokenizer_path):
    """The built-in Jinja form (written to final/chat_template.jinja, used by generate --template auto) renders
    a one-turn conversation exactly as the Alpaca record under the released rule, the input as the system."""
    tok = Tokenizer(real_tokenizer_path)
    for r in RECORDS[:5]:
        messages = ([{"role": "system", "content": r["input"]}] if r["input"] else []) + [
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": r["output"]},
        ]
        alpaca = TokenizedDataset.from_records([r], tok, 512, template="alpaca-claude2-released")
        chat = TokenizedDataset.from_records([{"messages": messages}], tok, 512, template="alpaca-claude2-released")
        assert alpaca[0][0].tolist() == chat[0][0].tolist() and alpaca[0][1].tolist() == chat[0][1].tolist(), r


# ------------------------------------------------------------------ the pad token, pure bf16, the whole recipe


@pytest.fixture(scope="module")
def tiny_llama2(tmp_path_factory) -> Path:
    """A tiny HF Llama with Llama-2's vocabulary of 32000 (written by transformers itself)."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama2")
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(path)
    return path


def test_pad_token_rows_are_the_mean_of_the_others(tiny_llama2):
    from safetensors.torch import load_file

    from c2a.model import CheckpointReader
    from c2a.model.vocab import AddedRowsReader

    original = load_file(tiny_llama2 / "model.safetensors")
    reader = AddedRowsReader(CheckpointReader(tiny_llama2))
    assert reader.config.vocab_size == 32001
    for ours, theirs in (("tok_embeddings.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        grown = reader.get(ours)
        assert grown.shape == (32001, 32)
        assert torch.equal(grown[:32000], original[theirs])
        torch.testing.assert_close(grown[32000].double(), original[theirs].double().mean(0), rtol=0, atol=1e-6)
    assert torch.equal(reader.get("norm.weight"), original["model.norm.weight"])


def _as_released_args(ckpt: Path, data: Path, tokenizer: Path, steps: int) -> list[str]:
    """The as-released recipe (the real config file) shrunk to a tiny model and four steps of 4 examples."""
    return [
        f"--config={ROOT / 'configs' / 'claude2-alpaca-7b-as-released.toml'}",
        f"--model.checkpoint={ckpt}",
        f"--data.path={data}",
        f"--data.tokenizer={tokenizer}",
        "--data.max_len=63",  # the long records are cut on the right, losing their EOS
        "--data.workers=1",
        "--train.global_batch=4",
        "--train.epochs=1",
        "--train.schedule_steps=4",  # a fixed horizon: the 2-step run resumes into the same schedule
        f"--train.max_steps={steps}",
        "--train.lr=1e-3",
        "--train.activation_checkpointing=none",
        "--train.save_every_minutes=0",
        "--train.progress=false",
        "--train.log_every=1",
    ]


def test_as_released_recipe_trains_pure_bf16_resumes_bitwise_and_exports_vocab_32001(
    tiny_llama2, real_tokenizer_path, tmp_path
):
    """Two ranks, every as-released setting (example weighting, hf schedule, released template, joint
    tokenization, right truncation, bf16 master weights and gradient reduction, the pad token): 4 steps in
    one go, and 2 + 2 with a resume in between, give the same final weights bit for bit; the export is bf16
    with vocab 32001, transformers loads it, and it carries the released template."""
    import json

    from safetensors.torch import load_file
    from train_runs import checkpoint_tensors, metrics, run_train

    transformers = pytest.importorskip("transformers")
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (RECORDS[:6] * 4)), encoding="utf-8")
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_train(2, whole, *_as_released_args(tiny_llama2, data, real_tokenizer_path, 4), tiny=False)
    run_train(2, split, *_as_released_args(tiny_llama2, data, real_tokenizer_path, 2), tiny=False)
    proc = run_train(2, split, *_as_released_args(tiny_llama2, data, real_tokenizer_path, 4), tiny=False)
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
    assert a["model.embed_tokens.weight"].shape == a["lm_head.weight"].shape == (32001, 32)
    # pure bf16: the checkpointed parameters and AdamW's moments themselves are bf16 (no fp32 master copy)
    saved = checkpoint_tensors(whole / "checkpoints" / "step_00000004", tmp_path)
    assert {t.dtype for t in saved["model"].values()} == {torch.bfloat16}
    moments = [v for st in saved["optim"]["state"].values() for k, v in st.items() if k.startswith("exp_avg")]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    rows_a, rows_b = metrics(whole), metrics(split)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert rows_a[0]["lr"] == 1e-3 and rows_a[-1]["lr"] < rows_a[1]["lr"]  # no warmup at 4 x 0.03, then cosine
    hf = transformers.LlamaForCausalLM.from_pretrained(whole / "final")
    assert hf.config.vocab_size == 32001 and hf.dtype == torch.bfloat16
    assert torch.isfinite(hf(input_ids=torch.tensor([[1, 32000, 450]])).logits).all()
    assert "{% if m['content'] != '' %}" in (whole / "final" / "chat_template.jinja").read_text()


# ------------------------------------------------------------------ the recipes, compare, the planner

# Every difference of the released training from the card (the facts above, points 1-7), as c2a keys
RELEASED_DIFFERENCES = {
    "data.template": "alpaca-claude2-released",  # 1
    "data.tokenization": "joint",  # 2
    "data.truncation": "right",  # 2
    "data.max_len": 1023,  # 2: 1024 tokens
    "train.loss_weighting": "example",  # 3
    "data.packing": False,  # 3: one example per micro-batch
    "train.lr_schedule": "hf",  # 4
    "train.warmup_rounding": "floor",  # 4
    "train.schedule_steps": 1218,  # 4
    "train.master_dtype": "bf16",  # 5
    "train.reduce_dtype": "bf16",  # 5
    "model.add_pad_token": True,  # 6
    "train.lr": 2e-5,  # 7
    "train.epochs": 3,  # 7
}


def _compare(*paths: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "c2a.train.compare", *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_compare_names_every_difference_of_the_as_released_recipe():
    """The shell on the 13B pair; the library on the 7B pair (the same differences, in-process)."""
    from c2a.config_diff import config_diff
    from c2a.options import parse_args

    card, released = (ROOT / "configs" / f"claude2-alpaca-13b{s}.toml" for s in ("", "-as-released"))
    proc = _compare(card, released)
    assert proc.returncode == 0, proc.stderr
    model_part, _, rest = proc.stdout.partition("change only speed, memory or records")
    for key, value in RELEASED_DIFFERENCES.items():
        assert f"  {key} " in model_part and f"-> {value!r}" in model_part, key
    assert f"{len(RELEASED_DIFFERENCES)} setting(s) change the trained model" in model_part
    assert "out_dir" in rest  # the only other difference, and not one that changes the model
    seven = [ROOT / "configs" / f"claude2-alpaca-7b{s}.toml" for s in ("", "-as-released")]
    diffs = config_diff(*(parse_args(["--config", str(p)]) for p in seven))
    assert {d.key: d.b for d in diffs if d.changes_model} == RELEASED_DIFFERENCES
    assert [d.key for d in diffs if not d.changes_model] == ["out_dir"]
    bad = _compare(card, ROOT / "configs" / "missing.toml")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --config") and "missing.toml" in bad.stderr


def test_planner_counts_pure_bf16_state_at_half_the_bytes():
    from c2a.config import LlamaConfig
    from c2a.plan.memory import Workload, plan_memory

    m = LlamaConfig.from_name("llama2-7b")
    fp32 = plan_memory(Workload(m, 1, 1024, ranks=16))
    bf16 = plan_memory(Workload(m, 1, 1024, ranks=16, master_bytes=2, reduce_bytes=2))
    n_shard = fp32.params // 4
    assert bf16.params == 2 * n_shard and bf16.grads == 2 * n_shard
    assert bf16.optimizer == fp32.optimizer - 4 * n_shard  # two bf16 moments; the fp32 step counters stay
    assert bf16.peak < fp32.peak - 4 * n_shard  # params + grads + moments: at least 8 bytes a parameter less
    from c2a.plan.workload import resolve_model

    released = build_config({"model": {"checkpoint": "SET-ME/Llama-2-7b-hf", "add_pad_token": True}})
    assert resolve_model(released)[0].vocab_size == 32001  # the planner sizes the model the trainer builds
