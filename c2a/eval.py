"""Evaluate a checkpoint on held-out Alpaca-format data, or on benchmarks through lm-evaluation-harness.

    python -m c2a.eval --model DIR --data FILE|demo [--limit N] [--alpaca-eval-output answers.json]
    python -m c2a.eval --model DIR --tasks arc_challenge,hellaswag [--num-fewshot N] [--include-path DIR] [--output FILE.json]
    python -m c2a.eval --model DIR --suite open-llm-v1      # the claude2-alpaca card's table

Reports, for the records of FILE (.json / .jsonl / .parquet, validated as training validates them) or of
the demo task's held-out split (`--data demo`, the split `python -m c2a.train` holds out):
  - loss: the mean cross-entropy over the response + EOS targets, exactly the training objective
    (`c2a.data.encode_example` with --max-len, prompt targets masked), summed over every target and divided
    by their count (so a batch of long answers weighs as much as its tokens), and perplexity = exp(loss);
  - for the demo task, greedy exact-match accuracy overall and per task type;
  - with --alpaca-eval-output, the model's answers as AlpacaEval reads them: a JSON list of
    {"instruction", "output", "generator"} (`alpaca_eval --model_outputs FILE`). AlpacaEval merges a
    model's outputs with its reference outputs on "instruction", and its own set folds any input into the
    instruction, so a record with an input is written as instruction + "\\n\\n" + input.
--output FILE writes the results as JSON too (lm-eval's result JSON with --tasks / --suite).
--alpaca-eval-prompts FILE answers the prompts of a local file instead (AlpacaEval's 805-prompt set: a JSON
list of objects with "instruction"); with --alpaca-eval-output.

--template (alpaca by default; auto, tokenizer or llama2-chat as in `python -m c2a.generate`) is the prompt
format of the generated answers (exact match, AlpacaEval): the loss is always computed on the records as
training encodes them.

--tasks / --suite (needs the `eval` extra: pip install -e ".[eval]") run lm-evaluation-harness with c2a's
model (c2a/inference/lm_eval.py): lm-eval's task names, its result JSON in --output. --suite open-llm-v1 runs
the card's four benchmarks at the Open LLM Leaderboard v1 settings and prints them beside the card's row.
The datasets come from the Hugging Face hub (network or a cache); local task YAMLs go in --include-path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from c2a.config import DataSection
from c2a.errors import USER_ERRORS, report
from c2a.inference import answers, load_model, load_tokenizer, prompt_format, write_alpaca_eval
from c2a.inference.answers import load_alpaca_eval_prompts
from c2a.inference.arguments import add_model_arguments
from c2a.inference.evaluation import DEFAULT_MAX_NEW_TOKENS, DEMO_MAX_NEW_TOKENS, evaluate_records, load_eval_records
from c2a.train.card import update_card


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m c2a.eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--model", required=True, help="HF or Meta checkpoint directory")
    ap.add_argument("--data", help="'demo' or an Alpaca-format .json / .jsonl / .parquet file")
    ap.add_argument("--tasks", help="lm-eval task names, comma-separated (lm-evaluation-harness, the eval extra)")
    ap.add_argument("--suite", choices=["open-llm-v1"], help="the model card's benchmark table (lm-evaluation-harness)")
    ap.add_argument("--num-fewshot", type=int, help="with --tasks: few-shot examples per task (default: the task's)")
    ap.add_argument("--include-path", type=Path, help="with --tasks: a folder of extra lm-eval task YAMLs")
    ap.add_argument(
        "--output",
        "--json-out",
        type=Path,
        help="write the results as JSON (lm-eval's result JSON with --tasks / --suite)",
    )
    ap.add_argument(
        "--max-len", type=int, default=DataSection().max_len, help="tokens per example, as in training (data.max_len)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=16, help="examples per forward pass (loss) and per generation batch"
    )
    ap.add_argument("--limit", type=int, help="evaluate only the first N records")
    ap.add_argument(
        "--skip-bad-rows", action="store_true", help="skip malformed records (counted in a warning) instead of stopping"
    )
    ap.add_argument(
        "--demo-heldout-size",
        type=int,
        default=DataSection().demo_heldout_size,
        help="with --data demo: the size of the held-out split (data.demo_heldout_size of the run)",
    )
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"generation limit per answer (default {DEMO_MAX_NEW_TOKENS} for the demo, {DEFAULT_MAX_NEW_TOKENS} otherwise)",
    )
    ap.add_argument(
        "--alpaca-eval-output",
        "--alpaca-eval-out",
        type=Path,
        help="write the model's answers as AlpacaEval model outputs (JSON)",
    )
    ap.add_argument(
        "--alpaca-eval-prompts",
        type=Path,
        help="answer these prompts (AlpacaEval's set as a local JSON file) instead of --data's",
    )
    ap.add_argument(
        "--update-card",
        action="store_true",
        help="add the results (--suite's table, or any evaluation's summary) to MODEL/README.md, the model card",
    )
    ap.add_argument("--generator", help="the model's name in the AlpacaEval file (default: the model directory's name)")
    add_model_arguments(ap)
    return ap


def check_args(args: argparse.Namespace) -> None:
    for name in ("max_len", "batch_size", "limit", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if sum(x is not None for x in (args.data, args.tasks, args.suite, args.alpaca_eval_prompts)) != 1:
        raise ValueError("give one of --data, --tasks, --suite or --alpaca-eval-prompts")
    if args.alpaca_eval_prompts and not args.alpaca_eval_output:
        raise ValueError("--alpaca-eval-prompts needs --alpaca-eval-output (where the answers go)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    if args.tasks or args.suite:
        if args.adapter:
            raise ValueError(
                "--adapter with --tasks/--suite: write the merged model first (python -m c2a.model.convert "
                "BASE OUT --merge-adapter ADAPTER) and evaluate OUT"
            )
        try:
            from c2a.inference.lm_eval import (
                run_lm_eval,
            )  # lm-evaluation-harness, the optional extra, is imported only there
        except ImportError as e:
            raise ValueError(str(e)) from None
        tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
        return run_lm_eval(
            args.model,
            tasks=tasks,
            suite=args.suite,
            tokenizer=args.tokenizer,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            include_path=args.include_path,
            output=args.output,
        )
    if args.alpaca_eval_prompts:
        return alpaca_eval_answers(args)
    records, described = load_eval_records(
        args.data, args.limit, args.demo_heldout_size, args.skip_bad_rows
    )  # bad data fails before loading weights
    demo = args.data == "demo"
    tok = load_tokenizer(args.model, args.tokenizer)
    fmt = prompt_format(args.template, tok) if demo or args.alpaca_eval_output else None  # before the weights are read
    model = load_model(args.model, tok, args.device, args.dtype, args.adapter)
    max_new = args.max_new_tokens or (DEMO_MAX_NEW_TOKENS if demo else DEFAULT_MAX_NEW_TOKENS)
    result = {"model": str(args.model), "data": described, "examples": len(records), "max_len": args.max_len}
    result |= evaluate_records(
        model,
        tok,
        records,
        max_len=args.max_len,
        batch_size=args.batch_size,
        fmt=fmt,
        max_new_tokens=max_new,
        demo=demo,
    )
    responses = result.pop("responses", None)
    if args.alpaca_eval_output:
        generator = args.generator or Path(args.model).resolve().name
        result["alpaca_eval_out"] = str(write_alpaca_eval(args.alpaca_eval_output, records, responses, generator))
    return result


def alpaca_eval_answers(args: argparse.Namespace) -> dict[str, Any]:
    records = load_alpaca_eval_prompts(args.alpaca_eval_prompts, args.limit)
    tok = load_tokenizer(args.model, args.tokenizer)
    fmt = prompt_format(args.template, tok)
    model = load_model(args.model, tok, args.device, args.dtype, args.adapter)
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    start = time.perf_counter()
    responses = answers(model, tok, records, max_new, args.batch_size, fmt)
    out = write_alpaca_eval(
        args.alpaca_eval_output, records, responses, args.generator or Path(args.model).resolve().name
    )
    return {
        "model": str(args.model),
        "examples": len(records),
        "alpaca_eval_out": str(out),
        "max_new_tokens": max_new,
        "generation_seconds": time.perf_counter() - start,
        "report": f"answers      {out}  (AlpacaEval model outputs, {len(records)} prompts of {args.alpaca_eval_prompts})",
    }


def summary(result: dict[str, Any]) -> str:
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
        lines.append(
            f"exact match  {100 * em['accuracy']:.1f}% of {em['examples']} (greedy, at most {result['max_new_tokens']} new tokens)"
        )
        lines.append(f"  {'task':<10} {'examples':>8} {'exact match':>12}")
        lines += [
            f"  {task:<10} {v['examples']:>8} {100 * v['accuracy']:>11.1f}%" for task, v in em["per_task"].items()
        ]
    if "alpaca_eval_out" in result:
        lines.append(
            f"answers      {result['alpaca_eval_out']}  (AlpacaEval model outputs, {result['examples']} records)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except USER_ERRORS as e:
        return report(e)
    print(summary(result), flush=True)
    if args.update_card:
        command = "python -m c2a.eval " + " ".join(sys.argv[1:] if argv is None else argv)
        print(f"card         {update_card(args.model, summary(result), command)}", flush=True)
    if args.output and not (args.tasks or args.suite):  # lm-eval's runs wrote their own result JSON there
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
