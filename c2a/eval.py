"""Evaluate a checkpoint on held-out Alpaca-format data, or on benchmarks through lm-evaluation-harness.

    python -m c2a.eval --model DIR --data FILE|demo [--limit N] [--alpaca-eval-out answers.json]
    python -m c2a.eval --model DIR --tasks arc_challenge,hellaswag [--num-fewshot N] [--include-path DIR] [--output FILE.json]
    python -m c2a.eval --model DIR --suite open-llm-v1      # the claude2-alpaca card's table

Reports, for the records of FILE (.json / .jsonl / .parquet, validated as training validates them) or of
the demo task's held-out split (`--data demo`, the split `python -m c2a.train` holds out):
  - loss: the mean cross-entropy over the response + EOS targets, exactly the training objective
    (`c2a.data.encode_example` with --max-len, prompt targets masked), summed over every target and divided
    by their count (so a batch of long answers weighs as much as its tokens), and perplexity = exp(loss);
  - for the demo task, greedy exact-match accuracy overall and per task type;
  - with --alpaca-eval-out, the model's answers as AlpacaEval reads them: a JSON list of
    {"instruction", "output", "generator"} (`alpaca_eval --model_outputs FILE`). AlpacaEval merges a
    model's outputs with its reference outputs on "instruction", and its own set folds any input into the
    instruction, so a record with an input is written as instruction + "\\n\\n" + input.
--json-out writes the numbers as JSON too. --alpaca-eval-prompts FILE answers the prompts of a local file
instead (AlpacaEval's 805-prompt set: a JSON list of objects with "instruction"); with --alpaca-eval-out.

--template (alpaca by default; auto, tokenizer or llama2-chat as in `python -m c2a.generate`) is the prompt
format of the generated answers (exact match, AlpacaEval): the loss is always computed on the records as
training encodes them.

--tasks / --suite (needs the `eval` extra: pip install -e ".[eval]") run lm-evaluation-harness with c2a's
model (c2a/lm_eval_model.py): lm-eval's task names, its result JSON in --output. --suite open-llm-v1 runs
the card's four benchmarks at the Open LLM Leaderboard v1 settings and prints them beside the card's row.
The datasets come from the Hugging Face hub (network or a cache); local task YAMLs go in --include-path.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from c2a.config import DataSection, EvalSection
from c2a.data import IGNORE_INDEX, Tokenizer, encode_example, load_records
from c2a.generate import USER_ERRORS, PromptFormat, add_device_arguments, add_template_argument, load_model, load_tokenizer, prompt_format
from c2a.model import Llama
from c2a.model.generate import generate_batch

DEMO_MAX_NEW_TOKENS = EvalSection().max_new_tokens  # demo answers are at most 7 tokens with EOS
DEFAULT_MAX_NEW_TOKENS = 512


@torch.no_grad()
def heldout_loss(model: Llama, tok: Tokenizer, records: Sequence[dict[str, str]], max_len: int, batch_size: int) -> tuple[float, int]:
    """(mean CE over every response + EOS target, number of targets). Examples are batched by length
    (right-padded, padding targets -100) so little compute goes to padding; the order does not change the
    sum."""
    device = next(model.parameters()).device
    encoded = [encode_example(r, tok, max_len) for r in records]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    total = torch.zeros((), dtype=torch.float64, device=device)
    targets = 0
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        T = len(chunk[0][0])
        ids = torch.full((len(chunk), T), tok.eos_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for b, (x, y) in enumerate(chunk):
            ids[b, : len(x)] = torch.tensor(x)
            labels[b, : len(y)] = torch.tensor(y)
        # normalizer 1: the loss comes back as the sum over this batch's targets
        total += model.loss(ids.to(device), labels.to(device), normalizer=1.0).double()
        targets += int((labels != IGNORE_INDEX).sum())
    return float(total) / max(targets, 1), targets


def answers(model: Llama, tok: Tokenizer, records: Sequence[dict[str, str]], max_new_tokens: int, batch_size: int,
            fmt: PromptFormat | None = None) -> list[str]:  # fmt: skip
    """Greedy responses to every record, `batch_size` prompts at a time, prompted as `fmt` says (default:
    Alpaca's template, as training encodes an Alpaca record)."""
    fmt = fmt or PromptFormat("alpaca", None, (tok.eos_id,))
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [fmt.encode(tok, r["instruction"], r["input"]) for r in chunk]
        for p, new in zip(prompts, generate_batch(model, prompts, max_new_tokens, stop_ids=fmt.stop_ids, vocab_size=tok.vocab_size)):
            if new and new[-1] in fmt.stop_ids:
                new = new[:-1]
            out.append(tok.decode_continuation(p, new))
    return out


def demo_exact_match(records: Sequence[dict[str, str]], responses: Sequence[str]) -> dict[str, Any]:
    from c2a.data.demo import exact_match

    hits: dict[str, list[bool]] = {}
    for r, text in zip(records, responses, strict=True):
        hits.setdefault(r["task"], []).append(exact_match(r, text))
    every = [h for v in hits.values() for h in v]
    return {"accuracy": sum(every) / len(every), "examples": len(every),
            "per_task": {t: {"accuracy": sum(v) / len(v), "examples": len(v)} for t, v in sorted(hits.items())}}  # fmt: skip


def alpaca_eval_records(records: Sequence[dict[str, str]], responses: Sequence[str], generator: str) -> list[dict[str, str]]:
    # outputs stripped of surrounding whitespace, as AlpacaEval's own decoding does (is_strip_output)
    return [{"instruction": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), "output": text.strip(), "generator": generator}
            for r, text in zip(records, responses, strict=True)]  # fmt: skip


def load_eval_records(data: str, limit: int | None, demo_heldout_size: int, skip_bad_rows: bool = False) -> tuple[list[dict[str, str]], str]:
    if data == "demo":
        from c2a.data.demo import demo_split

        # the held-out split is drawn first and record by record, so its first N records are the same for
        # any split size: --limit N evaluates a prefix of what training held out
        n = min(limit, demo_heldout_size) if limit else demo_heldout_size
        return demo_split(n_train=0, n_heldout=n)[1], f"demo task, held-out split ({n} examples)"
    loaded = load_records(data, skip_bad_rows=skip_bad_rows)
    records = loaded.records[:limit] if limit else loaded.records
    return records, f"{data} ({len(records)} of {len(loaded.records)} records)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m c2a.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    ap.add_argument("--model", required=True, help="HF or Meta checkpoint directory")
    ap.add_argument("--data", help="'demo' or an Alpaca-format .json / .jsonl / .parquet file")
    ap.add_argument("--tasks", help="lm-eval task names, comma-separated (lm-evaluation-harness, the eval extra)")
    ap.add_argument("--suite", choices=["open-llm-v1"], help="the model card's benchmark table (lm-evaluation-harness)")
    ap.add_argument("--num-fewshot", type=int, help="with --tasks: few-shot examples per task (default: the task's)")
    ap.add_argument("--include-path", type=Path, help="with --tasks: a folder of extra lm-eval task YAMLs")
    ap.add_argument("--output", type=Path, help="with --tasks / --suite: lm-eval's result JSON")
    ap.add_argument("--tokenizer", help="SentencePiece tokenizer.model or HF tokenizer.json (default: DIR/tokenizer.model, else DIR/tokenizer.json)")
    ap.add_argument("--max-len", type=int, default=DataSection().max_len, help="tokens per example, as in training (data.max_len)")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (loss) and per generation batch")
    ap.add_argument("--limit", type=int, help="evaluate only the first N records")
    ap.add_argument("--skip-bad-rows", action="store_true", help="skip malformed records (counted in a warning) instead of stopping")
    ap.add_argument("--demo-heldout-size", type=int, default=DataSection().demo_heldout_size,
                    help="size of the demo's held-out split (as data.demo_heldout_size in training)")  # fmt: skip
    ap.add_argument("--max-new-tokens", type=int,
                    help=f"generation limit ({DEMO_MAX_NEW_TOKENS} for the demo task, else {DEFAULT_MAX_NEW_TOKENS})")  # fmt: skip
    ap.add_argument("--alpaca-eval-out", type=Path, help="write the model's answers as AlpacaEval model outputs (JSON)")
    ap.add_argument("--alpaca-eval-prompts", type=Path, help="answer these prompts (AlpacaEval's set as a local JSON file) instead of --data's")
    ap.add_argument("--generator", help="the model's name in the AlpacaEval file (default: the model directory's name)")
    add_template_argument(ap)
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON")
    add_device_arguments(ap)
    return ap


def load_alpaca_eval_prompts(path: Path, limit: int | None) -> list[dict[str, str]]:
    """AlpacaEval's evaluation set (alpaca_eval.json: a JSON list, or JSON lines, of objects whose
    "instruction" holds the whole prompt) as records with an empty input."""
    try:
        text = path.read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--alpaca-eval-prompts {path}: not a JSON list or JSON lines file ({e})") from None
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"]:
            raise ValueError(f"--alpaca-eval-prompts {path}: record {i} has no \"instruction\" string")
        records.append({"instruction": row["instruction"], "input": "", "output": ""})
    return records[:limit] if limit else records


def run(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("max_len", "batch_size", "limit", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if sum(x is not None for x in (args.data, args.tasks, args.suite, args.alpaca_eval_prompts)) != 1:
        raise ValueError("give one of --data, --tasks, --suite or --alpaca-eval-prompts")
    if args.tasks or args.suite:
        try:
            from c2a.lm_eval_model import run_lm_eval  # lm-evaluation-harness, the optional extra, is imported only there
        except ImportError as e:
            raise ValueError(str(e)) from None
        return run_lm_eval(args)
    if args.alpaca_eval_prompts:
        if not args.alpaca_eval_out:
            raise ValueError("--alpaca-eval-prompts needs --alpaca-eval-out (where the answers go)")
        return alpaca_eval_answers(args)
    records, described = load_eval_records(args.data, args.limit, args.demo_heldout_size, args.skip_bad_rows)  # bad data fails before loading weights
    demo = args.data == "demo"
    tok = load_tokenizer(args.model, args.tokenizer)
    fmt = prompt_format(args.template, tok) if demo or args.alpaca_eval_out else None  # before the weights are read
    model = load_model(args.model, tok, args.device, args.dtype)
    result: dict[str, Any] = {"model": str(args.model), "data": described, "examples": len(records), "max_len": args.max_len}
    start = time.perf_counter()
    loss, targets = heldout_loss(model, tok, records, args.max_len, args.batch_size)
    result.update(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, targets=targets, loss_seconds=time.perf_counter() - start)
    if fmt is not None:
        max_new = args.max_new_tokens or (DEMO_MAX_NEW_TOKENS if demo else DEFAULT_MAX_NEW_TOKENS)
        start = time.perf_counter()
        responses = answers(model, tok, records, max_new, args.batch_size, fmt)
        result.update(max_new_tokens=max_new, generation_seconds=time.perf_counter() - start)
        if demo:
            result["exact_match"] = demo_exact_match(records, responses)
        if args.alpaca_eval_out:
            generator = args.generator or Path(args.model).resolve().name
            args.alpaca_eval_out.parent.mkdir(parents=True, exist_ok=True)
            args.alpaca_eval_out.write_text(json.dumps(alpaca_eval_records(records, responses, generator), indent=2, ensure_ascii=False) + "\n")
            result["alpaca_eval_out"] = str(args.alpaca_eval_out)
    return result


def alpaca_eval_answers(args: argparse.Namespace) -> dict[str, Any]:
    records = load_alpaca_eval_prompts(args.alpaca_eval_prompts, args.limit)
    tok = load_tokenizer(args.model, args.tokenizer)
    fmt = prompt_format(args.template, tok)
    model = load_model(args.model, tok, args.device, args.dtype)
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    start = time.perf_counter()
    responses = answers(model, tok, records, max_new, args.batch_size, fmt)
    generator = args.generator or Path(args.model).resolve().name
    args.alpaca_eval_out.parent.mkdir(parents=True, exist_ok=True)
    args.alpaca_eval_out.write_text(json.dumps(alpaca_eval_records(records, responses, generator), indent=2, ensure_ascii=False) + "\n")
    return {"model": str(args.model), "examples": len(records), "alpaca_eval_out": str(args.alpaca_eval_out), "max_new_tokens": max_new,
            "generation_seconds": time.perf_counter() - start, "report": f"answers      {args.alpaca_eval_out}  (AlpacaEval model outputs, "
            f"{len(records)} prompts of {args.alpaca_eval_prompts})"}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    if "report" in result:  # lm-eval tasks, the suite's table, AlpacaEval answers
        return result["report"]
    lines = [
        f"model        {result['model']}",
        f"data         {result['data']}",
        f"loss         {result['loss']:.4f}  (mean cross-entropy over {result['targets']:,} response + EOS targets, max_len {result['max_len']})",
        f"perplexity   {result['perplexity']:.3f}",
    ]
    em = result.get("exact_match")
    if em:
        lines.append(f"exact match  {100 * em['accuracy']:.1f}% of {em['examples']} (greedy, at most {result['max_new_tokens']} new tokens)")
        lines.append(f"  {'task':<10} {'examples':>8} {'exact match':>12}")
        lines += [f"  {task:<10} {v['examples']:>8} {100 * v['accuracy']:>11.1f}%" for task, v in em["per_task"].items()]
    if "alpaca_eval_out" in result:
        lines.append(f"answers      {result['alpaca_eval_out']}  (AlpacaEval model outputs, {result['examples']} records)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except USER_ERRORS as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    print(report(result), flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
