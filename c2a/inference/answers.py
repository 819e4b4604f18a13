"""A model's answers to instructions (one, or a batch of records), the demo task's exact match, and
AlpacaEval's model-outputs file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from c2a.data.demo import exact_match
from c2a.data.tokenizer import Tokenizer
from c2a.inference.prompts import PromptFormat, alpaca_format
from c2a.model import Llama
from c2a.model.decode import generate_batch


def strip_stop(new_ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    """The generated ids without the stop token generation ended at (if it ended at one)."""
    return new_ids[:-1] if new_ids and new_ids[-1] in stop_ids else new_ids


def answers(
    model: Llama,
    tok: Tokenizer,
    records: Sequence[dict[str, str]],
    max_new_tokens: int,
    batch_size: int = 1,
    fmt: PromptFormat | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """The responses to every record (its instruction and input), `batch_size` prompts at a time, prompted as
    `fmt` says (default: Alpaca's template, as training encodes an Alpaca record). Greedy by default."""
    fmt = fmt or alpaca_format(tok)
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [fmt.encode(tok, r["instruction"], r.get("input", "")) for r in chunk]
        generated = generate_batch(
            model,
            prompts,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_ids=fmt.stop_ids,
            seed=seed,
            vocab_size=tok.vocab_size,
        )
        out += [tok.decode_continuation(p, strip_stop(new, fmt.stop_ids)) for p, new in zip(prompts, generated)]
    return out


def respond(
    model: Llama,
    tok: Tokenizer,
    instruction: str,
    input: str = "",
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    fmt: PromptFormat | None = None,
) -> str:
    """The model's response to one instruction (Alpaca's prompt unless `fmt` says otherwise), its stop token dropped."""
    record = {"instruction": instruction, "input": input}
    return answers(model, tok, [record], max_new_tokens, fmt=fmt, temperature=temperature, top_p=top_p, seed=seed)[0]


def demo_exact_match(records: Sequence[dict[str, str]], responses: Sequence[str]) -> dict[str, Any]:
    """The demo task's exact match over held-out records: overall and per task type."""
    hits: dict[str, list[bool]] = {}
    for r, text in zip(records, responses, strict=True):
        hits.setdefault(r["task"], []).append(exact_match(r, text))
    every = [h for v in hits.values() for h in v]
    return {
        "accuracy": sum(every) / len(every),
        "examples": len(every),
        "per_task": {t: {"accuracy": sum(v) / len(v), "examples": len(v)} for t, v in sorted(hits.items())},
    }


def load_alpaca_eval_prompts(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    """AlpacaEval's evaluation set (alpaca_eval.json: a JSON list, or JSON lines, of objects whose
    "instruction" holds the whole prompt) as records with an empty input."""
    try:
        text = path.read_text()
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--alpaca-eval-prompts {path}: not a JSON list or JSON lines file ({e})") from None
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"]:
            raise ValueError(f'--alpaca-eval-prompts {path}: record {i} has no "instruction" string')
        records.append({"instruction": row["instruction"], "input": "", "output": ""})
    return records[:limit] if limit else records


def write_alpaca_eval(path: Path, records: Sequence[dict[str, str]], responses: Sequence[str], generator: str) -> Path:
    """The answers as AlpacaEval's model outputs (`alpaca_eval --model_outputs FILE`): a JSON list of
    {"instruction", "output", "generator"}. AlpacaEval merges a model's outputs with its reference outputs on
    "instruction", and its own set folds any input into the instruction, so a record with an input is written
    as instruction + "\\n\\n" + input; outputs are stripped of surrounding whitespace, as AlpacaEval's own
    decoding does (is_strip_output)."""
    rows = [
        {
            "instruction": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else ""),
            "output": text.strip(),
            "generator": generator,
        }
        for r, text in zip(records, responses, strict=True)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    return path
