"""`python -m c2a.eval --data`: a checkpoint's held-out loss on Alpaca-format records (or the demo task's
held-out split), its greedy answers, and the demo's exact match."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from c2a.config import EvalSection
from c2a.data import Tokenizer, load_records
from c2a.data.demo import demo_split
from c2a.inference.answers import answers, demo_exact_match
from c2a.inference.heldout import heldout_loss
from c2a.inference.prompts import PromptFormat
from c2a.model import Llama

DEMO_MAX_NEW_TOKENS = EvalSection().max_new_tokens  # demo answers are at most 7 tokens with EOS
DEFAULT_MAX_NEW_TOKENS = 512


def load_eval_records(
    data: str, limit: int | None, demo_heldout_size: int, skip_bad_rows: bool = False
) -> tuple[list[dict[str, str]], str]:
    """The records of a data file, or of the demo task's held-out split ("demo"), and a line describing them."""
    if data == "demo":
        # the held-out split is drawn first and record by record, so its first N records are the same for
        # any split size: limit N evaluates a prefix of what training held out
        n = min(limit, demo_heldout_size) if limit else demo_heldout_size
        return demo_split(n_train=0, n_heldout=n)[1], f"demo task, held-out split ({n} examples)"
    loaded = load_records(data, skip_bad_rows=skip_bad_rows, skip_hint="--skip-bad-rows")
    records = loaded.records[:limit] if limit else loaded.records
    return records, f"{data} ({len(records)} of {len(loaded.records)} records)"


def evaluate_records(
    model: Llama,
    tok: Tokenizer,
    records: Sequence[dict[str, str]],
    *,
    max_len: int,
    batch_size: int,
    fmt: PromptFormat | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    demo: bool = False,
) -> dict[str, Any]:
    """{loss, perplexity, targets, seconds}; with a prompt format `fmt`, also the greedy `responses` (and, for
    the demo task, `exact_match`)."""
    start = time.perf_counter()
    loss, targets = heldout_loss(model, tok, records, max_len, batch_size)
    # exp overflows a float past ~709
    result: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "targets": targets,
        "loss_seconds": time.perf_counter() - start,
    }
    if fmt is None:
        return result
    start = time.perf_counter()
    responses = answers(model, tok, records, max_new_tokens, batch_size, fmt)
    result.update(responses=responses, max_new_tokens=max_new_tokens, generation_seconds=time.perf_counter() - start)
    if demo:
        result["exact_match"] = demo_exact_match(records, responses)
    return result
