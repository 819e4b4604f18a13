"""c2a's lm-evaluation-harness model (c2a/inference/lm_eval.py) against lm-eval's own `hf` model on c2a's HF export
of the same weights: local tasks (multiple choice, rolling log-likelihood, generate_until) must give the same
per-request results and the same metrics; the CLI paths of `python -m c2a.eval`, the card's table, and the
offline error of --suite. Needs the `eval` extra (lm-eval, accelerate, protobuf for HF's Llama tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra is not installed: pip install -e '.[eval]'")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from c2a.config import LlamaConfig  # noqa: E402
from c2a.data import Tokenizer  # noqa: E402
from c2a.inference.lm_eval import C2ALM, OPEN_LLM_V1, evaluate_tasks, suite_scores, suite_table  # noqa: E402
from c2a.model import Llama, save_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["c2a_mc", "c2a_rolling", "c2a_gen"]
# max_seq_len 40: the rolling texts (60-110 tokens) need several windows, the prompts get cut from the left
CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, ffn_hidden_dim=96, max_seq_len=40)

WORDS = (
    "the river carried small stones past the old mill while children counted boats and birds above the hills "
    "a quiet market opened early with bread honey apples and warm tea for travellers from the northern roads"
).split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + 3 * k) % len(WORDS)] for k in range(n))


def _write_tasks(folder: Path) -> None:
    """Three lm-eval tasks over local JSON lines files (dataset_path: json), one per request type."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = [
        {"question": _text(i, 6), "choices": [_text(i + 1, 1 + (i + c) % 4) for c in range(4)], "answer": i % 4}
        for i in range(10)
    ]
    rolling = [{"text": _text(i, 45 + 12 * i) + "."} for i in range(4)]
    gen = [{"question": _text(i, 5 + i), "answer": _text(i + 2, 1)} for i in range(6)]
    for name, rows in (("mc", mc), ("rolling", rolling), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "c2a_mc.yaml").write_text(
        f"task: c2a_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "c2a_rolling.yaml").write_text(
        f"task: c2a_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'rolling.jsonl'}\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "c2a_gen.yaml").write_text(
        f"task: c2a_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\noutput_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "e"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


_CACHE: dict[str, tuple] = {}  # built once for the module (real_tokenizer_path is a per-test fixture)


@pytest.fixture
def setup(tmp_path_factory, real_tokenizer_path):
    """A tiny model (random weights, spread wider than init so that its choices are not near-ties) saved as c2a
    exports it, with Llama-2's tokenizer; the three local tasks; a TaskManager that knows them."""
    if "setup" not in _CACHE:
        _CACHE["setup"] = _build(tmp_path_factory.mktemp("lm_eval"), real_tokenizer_path)
    return _CACHE["setup"]


def _build(tmp: Path, tokenizer: Path) -> tuple:
    torch.manual_seed(0)
    model = Llama(CFG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    export = tmp / "model"
    save_pretrained(model, export)
    shutil.copyfile(tokenizer, export / "tokenizer.model")
    _write_tasks(tmp / "tasks")
    return (
        model.eval(),
        Tokenizer(tokenizer),
        export,
        tmp,
        TaskManager(include_path=str(tmp / "tasks"), include_defaults=False),
    )


@pytest.fixture
def both_results(setup):
    """lm-eval run on the three tasks by c2a's model and by lm-eval's hf model on the export, samples logged."""
    if "results" not in _CACHE:
        _CACHE["results"] = _run_both(*setup)
    return _CACHE["results"]


def _run_both(model: Llama, tok: Tokenizer, export: Path, tmp: Path, tm: TaskManager) -> tuple[dict, dict]:
    import transformers

    # HF's own Llama tokenizer for the oracle, built from the same tokenizer.model (BOS added, as Llama's is)
    hf_tok_dir = tmp / "hf_tokenizer"
    hf_tok_dir.mkdir(exist_ok=True)
    shutil.copyfile(export / "tokenizer.model", hf_tok_dir / "tokenizer.model")
    (hf_tok_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "legacy": True,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_tok_dir)
    hf = HFLM(pretrained=str(export), tokenizer=hf_tok, batch_size=3, dtype="float32", device="cpu")
    ours = evaluate_tasks(C2ALM(model, tok, batch_size=3), TASKS, None, None, None, log_samples=True, task_manager=tm)
    theirs = lm_eval.simple_evaluate(model=hf, tasks=TASKS, task_manager=tm, log_samples=True)
    return ours, theirs


def test_per_request_results_match_lm_eval_hf_model(both_results):
    ours, theirs = both_results
    for task in TASKS:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        for sa, sb in zip(a, b, strict=True):
            assert sa["arguments"] == sb["arguments"]  # the same requests, built by lm-eval from the same docs
            for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
                if task == "c2a_gen":
                    assert ra == rb, (sa["arguments"], ra, rb)
                    assert "e" not in ra[0]  # cut at the stop string
                else:  # (log-likelihood, greedy) pairs, or a rolling log-likelihood
                    ra, rb = (ra[0], rb[0]) if isinstance(ra[0], (list, tuple)) else (ra, rb)
                    assert abs(ra[0] - rb[0]) < 1e-4, (task, sa["arguments"], ra, rb)
                    assert ra[1:] == rb[1:], (task, ra, rb)
    rolling = [s["resps"][0][0] for s in ours["samples"]["c2a_rolling"]]
    assert all(r < -50 for r in rolling)  # every token of texts longer than one window is scored


def test_metrics_match_lm_eval_hf_model(both_results):
    ours, theirs = both_results
    for task, metrics in (
        ("c2a_mc", ("acc,none", "acc_norm,none")),
        ("c2a_rolling", ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")),
        ("c2a_gen", ("exact_match,none",)),
    ):
        for m in metrics:
            assert ours["results"][task][m] == pytest.approx(theirs["results"][task][m], rel=1e-5), (task, m)
    # the choices are not all alike: some right, some wrong, and length normalisation changes some picks
    picks = [max(range(4), key=lambda c: s["resps"][c][0][0]) for s in ours["samples"]["c2a_mc"]]
    assert len(set(picks)) > 1


def test_eval_cli_tasks_writes_lm_eval_json(setup, both_results):
    _, _, export, tmp, _ = setup
    out = tmp / "cli.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "c2a.eval",
            "--model",
            str(export),
            "--tasks",
            "c2a_mc,c2a_rolling",
            "--include-path",
            str(tmp / "tasks"),
            "--batch-size",
            "4",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(out.read_text())
    ours = both_results[0]
    for task, m in (("c2a_mc", "acc_norm,none"), ("c2a_rolling", "word_perplexity,none")):
        assert written["results"][task][m] == pytest.approx(ours["results"][task][m], rel=1e-5)
    assert "c2a_mc" in proc.stdout and "acc_norm" in proc.stdout  # lm-eval's table


def test_suite_offline_names_the_dataset(setup):
    _, _, export, _, _ = setup
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(setup[3] / "empty_hf_home"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "c2a.eval", "--model", str(export), "--suite", "open-llm-v1", "--limit", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert (
        "ARC: lm-eval's task arc_challenge reads the hub dataset allenai/ai2_arc, which could not be loaded" in err
    ), err[-3000:]
    assert "HF_DATASETS_OFFLINE=1" in err and "--include-path" in err and "Traceback" not in err


def test_suite_table_in_the_card_layout():
    # MMLU is the plain mean over its subjects (lm-eval's group weights by size): 0.25, 0.5, 0.6 -> 45.00
    results = {
        "arc_challenge": {"results": {"arc_challenge": {"acc_norm,none": 0.5, "acc,none": 0.1}}},
        "hellaswag": {"results": {"hellaswag": {"acc_norm,none": 0.8}}},
        "mmlu": {
            "results": {
                "mmlu": {"acc,none": 0.9},
                "mmlu_a": {"acc,none": 0.25},
                "mmlu_b": {"acc,none": 0.5},
                "mmlu_c": {"acc,none": 0.6},
            },
            "configs": {"mmlu_a": {}, "mmlu_b": {}, "mmlu_c": {}},
        },
        "truthfulqa_mc2": {"results": {"truthfulqa_mc2": {"acc,none": 0.4}}},
    }
    scores = {b.column: suite_scores(b, results[b.task]) for b in OPEN_LLM_V1}
    assert scores == pytest.approx({"ARC": 50.0, "HellaSwag": 80.0, "MMLU": 45.0, "TruthfulQA": 40.0})
    scores["Average"] = 53.75
    table = suite_table("mine", scores).splitlines()
    assert table[0] == "| Model | ARC | HellaSwag | MMLU | TruthfulQA | Average |"
    assert table[2] == "| mine | 50.00 | 80.00 | 45.00 | 40.00 | 53.75 |"
    assert table[3] == "| claude2-alpaca-13b (card) | 61.18 | 84.08 | 55.74 | 44.18 | 61.29 |"
    assert (
        "ARC: arc_challenge 25-shot acc_norm; HellaSwag: hellaswag 10-shot acc_norm; MMLU: mmlu 5-shot acc" in table[4]
    )


def test_model_args_as_lm_eval_cli_passes_them(setup):
    """`lm_eval --model c2a --model_args pretrained=DIR,dtype=fp32,batch_size=2` builds the same scorer."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    model, tok, export, _, _ = setup
    lm = get_model("c2a").create_from_arg_string(f"pretrained={export},dtype=fp32", {"batch_size": 2, "device": "cpu"})
    assert isinstance(lm, C2ALM) and lm._batch_size == 2 and lm.model.cfg == CFG
    requests = [
        Instance("loglikelihood", {}, ("Question: the river\nAnswer:", " boats"), 0),
        Instance("loglikelihood", {}, ("", "the river"), 1),
    ]
    assert lm.loglikelihood(requests) == C2ALM(model, tok).loglikelihood(requests)
