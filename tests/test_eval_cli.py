"""`python -m c2a.generate` and `python -m c2a.eval` end to end, in subprocesses, on tiny saved checkpoints
with the demo tokenizer: the Alpaca template as written here, stdin mode, held-out loss against a direct
full-logits computation, demo exact match per task, AlpacaEval's output file, and clear errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bigram_model import bigram_llama

from c2a.config import LlamaConfig
from c2a.data import Tokenizer, encode_example
from c2a.data.demo import DEMO_TOKENIZER, demo_split
from c2a.model import Llama, load_pretrained, save_pretrained
from c2a.model.generate import generate

ROOT = Path(__file__).resolve().parents[1]
CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=48)
ANSWER = "9"  # what the bigram model answers to every demo prompt
LIMIT = 100  # demo held-out records evaluated: "9" is the answer of 2 count and 5 max records among them

# The Alpaca template, spelled out here rather than imported, so that the CLI is checked against the text.
TEMPLATE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a response "
    "that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Same kernels in this process as in the CLI subprocesses (OMP_NUM_THREADS=1 below), and no OpenMP
    spinning on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def save(model: Llama, path: Path) -> Path:
    save_pretrained(model, path)
    shutil.copyfile(DEMO_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """Random weights at std 0.2: confident, prompt-dependent greedy choices."""
    torch.manual_seed(0)
    model = Llama(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.2)
    return save(model, tmp_path_factory.mktemp("random") / "random-llama")


@pytest.fixture(scope="module")
def bigram_model(tmp_path_factory) -> Path:
    """A model whose next token depends on the current token only (the blocks add nothing: wo = w2 = 0):
    after the template's final "### Response:" piece it says "9", after "9" it says EOS. So its greedy
    answer to every demo prompt is "9", and which held-out records that answers is known without it."""
    tok = Tokenizer(DEMO_TOKENIZER)
    response_piece = tok.encode(TEMPLATE.format(instruction="x"), bos=True)[-1]
    assert tok.encode(TEMPLATE_INPUT.format(instruction="x", input="y"), bos=True)[-1] == response_piece
    (answer_piece,) = tok.encode_continuation(ANSWER)
    model = bigram_llama(CFG, {answer_piece: (response_piece,), tok.eos_id: (answer_piece,)}, seed=1)
    return save(model, tmp_path_factory.mktemp("bigram") / "bigram-llama")


def greedy_text(model: Llama, tok: Tokenizer, prompt_text: str, max_new_tokens: int) -> str:
    ids = tok.encode(prompt_text, bos=True)
    new = generate(model, ids, max_new_tokens, stop_ids=(tok.eos_id,))
    return tok.decode_continuation(ids, [t for t in new if t != tok.eos_id])


def test_generate_prompt_applies_alpaca_template(random_model):
    proc = run_cli(
        "c2a.generate",
        "--model",
        str(random_model),
        "--prompt",
        "Reverse the order of these words.",
        "--input",
        "cat dog owl",
        "--max-new-tokens",
        "12",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tok = load_pretrained(random_model).eval(), Tokenizer(random_model / "tokenizer.model")
    expected = greedy_text(
        model, tok, TEMPLATE_INPUT.format(instruction="Reverse the order of these words.", input="cat dog owl"), 12
    )
    assert expected.strip()
    assert proc.stdout == expected + "\n"


def test_generate_reads_instructions_from_stdin(random_model):
    instructions = ["Copy the text: cat dog", "What is 3 + 4?"]
    proc = run_cli(
        "c2a.generate",
        "--model",
        str(random_model),
        "--max-new-tokens",
        "8",
        stdin=f"{instructions[0]}\n\n{instructions[1]}\n",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tok = load_pretrained(random_model).eval(), Tokenizer(random_model / "tokenizer.model")
    expected = [greedy_text(model, tok, TEMPLATE.format(instruction=i), 8) for i in instructions]
    assert expected[0] != expected[1]
    assert proc.stdout == "".join(e + "\n\n" for e in expected)  # the empty line asked nothing


def direct_loss(model: Llama, tok: Tokenizer, records: list[dict[str, str]], max_len: int) -> float:
    """Mean CE over every response + EOS target, from full logits, one example at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            ids, labels = encode_example(r, tok, max_len)
            logits = model(torch.tensor([ids]))[0].double()
            total += F.cross_entropy(logits, torch.tensor(labels), ignore_index=-100, reduction="sum").item()
            count += sum(y != -100 for y in labels)
    return total / count


def test_eval_loss_on_a_data_file(random_model, tmp_path):
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
        {"instruction": "Copy the text.", "input": "cat dog owl", "output": "cat dog owl"},
        {"instruction": "Add the two numbers.", "input": "2 + 5", "output": "7"},
    ]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "result.json"
    proc = run_cli(
        "c2a.eval",
        "--model",
        str(random_model),
        "--data",
        str(data),
        "--batch-size",
        "2",
        "--max-len",
        "40",
        "--json-out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    model, tok = load_pretrained(random_model).eval(), Tokenizer(random_model / "tokenizer.model")
    expected = direct_loss(model, tok, records, 40)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["examples"] == 3 and "exact_match" not in result
    assert f"{expected:.4f}" in proc.stdout and "perplexity" in proc.stdout


def test_eval_demo_exact_match_per_task_and_alpaca_eval_file(bigram_model, tmp_path):
    answers, out = tmp_path / "answers.json", tmp_path / "result.json"
    proc = run_cli(
        "c2a.eval",
        "--model",
        str(bigram_model),
        "--data",
        "demo",
        "--limit",
        str(LIMIT),
        "--batch-size",
        "16",
        "--alpaca-eval-out",
        str(answers),
        "--generator",
        "c2a-bigram",
        "--json-out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    heldout = demo_split(n_train=0, n_heldout=500)[1][:LIMIT]  # the split training holds out, first LIMIT records

    hits: dict[str, list[bool]] = {}
    for r in heldout:
        hits.setdefault(r["task"], []).append(r["output"] == ANSWER)
    expected = {t: {"accuracy": sum(v) / len(v), "examples": len(v)} for t, v in sorted(hits.items())}
    assert result["exact_match"]["per_task"] == expected
    assert result["exact_match"]["accuracy"] == pytest.approx(sum(map(sum, hits.values())) / LIMIT)
    assert sorted(t for t, v in expected.items() if v["accuracy"] > 0) == ["count", "max"]
    for task, v in expected.items():  # the printed per-task table
        assert any(
            line.split()[:3] == [task, str(v["examples"]), f"{100 * v['accuracy']:.1f}%"]
            for line in proc.stdout.splitlines()
        ), task

    model, tok = load_pretrained(bigram_model).eval(), Tokenizer(bigram_model / "tokenizer.model")
    assert result["loss"] == pytest.approx(direct_loss(model, tok, heldout, 512), rel=1e-5)

    written = json.loads(answers.read_text())
    assert len(written) == LIMIT
    for r, w in zip(heldout, written):
        assert set(w) == {"instruction", "output", "generator"}
        assert w["instruction"] == (r["instruction"] + "\n\n" + r["input"] if r["input"] else r["instruction"])
        assert w["output"] == ANSWER and w["generator"] == "c2a-bigram"


def test_bad_input_gives_a_clear_error(random_model, tmp_path):
    missing = tmp_path / "no-such-model"
    proc = run_cli("c2a.generate", "--model", str(missing), "--prompt", "hello")
    assert proc.returncode == 1
    assert str(missing) in proc.stderr and "not a directory" in proc.stderr and "Traceback" not in proc.stderr

    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "Say bye.", "input": ""}\n')
    proc = run_cli("c2a.eval", "--model", str(random_model), "--data", str(data))
    assert proc.returncode == 1
    assert f"{data}:2" in proc.stderr and "missing field 'output'" in proc.stderr and "Traceback" not in proc.stderr


def test_alpaca_eval_prompts_from_a_local_file(bigram_model, tmp_path, capsys):
    # AlpacaEval's evaluation set as it is distributed: a JSON list whose "instruction" holds the whole prompt
    prompts = [
        {
            "instruction": f"Count the words: {' '.join(['w'] * n)}",
            "output": "reference",
            "generator": "text_davinci_003",
            "dataset": "helpful_base",
        }
        for n in range(1, 6)
    ]
    prompts_file, answers = tmp_path / "alpaca_eval.json", tmp_path / "answers.json"
    prompts_file.write_text(json.dumps(prompts))
    proc = run_cli(
        "c2a.eval",
        "--model",
        str(bigram_model),
        "--alpaca-eval-prompts",
        str(prompts_file),
        "--alpaca-eval-out",
        str(answers),
        "--limit",
        "4",
        "--max-new-tokens",
        "8",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(answers.read_text())
    assert [w["instruction"] for w in written] == [p["instruction"] for p in prompts[:4]]
    assert all(w["output"] == ANSWER and w["generator"] == "bigram-llama" for w in written)
    assert f"4 prompts of {prompts_file}" in proc.stdout

    # errors found before any weights load: in this process (main() prints them and returns 1)
    from c2a.eval import main

    prompts_file.write_text(json.dumps([{"instruction": "ok"}, {"prompt": "no instruction key"}]))
    for args, message in (
        (
            ["--alpaca-eval-prompts", str(prompts_file), "--alpaca-eval-out", str(answers)],
            f'{prompts_file}: record 1 has no "instruction" string',
        ),
        (["--alpaca-eval-prompts", str(prompts_file)], "--alpaca-eval-prompts needs --alpaca-eval-out"),
        ([], "give one of --data, --tasks, --suite or --alpaca-eval-prompts"),
    ):
        assert main(["--model", str(bigram_model), *args]) == 1
        assert message in capsys.readouterr().err
