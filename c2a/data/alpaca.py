"""Stanford Alpaca's prompt template, example encoding with loss masking, and record loading.

Template: the two prompts of Stanford Alpaca's train.py (PROMPT_DICT), character for character; the
`### Input:` variant is used when the record's input is not the empty string (the same test Alpaca uses).
The prompt ends with "### Response:" and the response follows with no separator.

Encoding: tokens = [BOS] + prompt + response + [EOS], the response encoded as a continuation (no
SentencePiece dummy-prefix space), so decoding gives back exactly prompt + response. The model sees
input_ids = tokens[:-1] and is trained on labels = tokens[1:], with the targets that are prompt tokens set
to -100: the loss covers the response and the EOS. The prompt is tokenized on its own, exactly as it is at
generation time, so no piece ever straddles the prompt/response boundary.

Length: `max_len` bounds len(input_ids) = len(tokens) - 1, so one example always fits a packed row of
`max_len` positions. Over-length policy ("truncate", the default), applied to tokens (budget max_len + 1):
  1. the prompt gives way first: its middle is cut (keeping its head, which holds BOS and the start of the
     instruction, and its tail, which ends with "### Response:") until the response fits, but the prompt
     keeps at least min(its length, budget // 2) tokens;
  2. if the response still does not fit, its tail is cut, and the EOS is kept as the last token.
So every example keeps at least budget // 2 response tokens (or all of them) and its EOS target.
`truncation="drop"` drops every over-length example instead; `truncation="right"` (the released
claude2-alpaca model's, HF's truncation=True) keeps the first max_len + 1 tokens, so a long response loses
its tail and its EOS, and drops an example left with no trained target. All three are counted by the caller.

The released claude2-alpaca model's encoding, as settings (its dataset.py, read 2026-12-06): template
"alpaca-claude2-released" picks the "### Input:" prompt whenever the instruction is non-empty (Alpaca's rule
picks it by the input); tokenization "joint" encodes prompt + response in one piece, as its slow
LlamaTokenizer did with the EOS written as the text "</s>" (id 2): [BOS] + encode(prompt + response) + [EOS],
with the first len([BOS] + encode(prompt)) tokens not trained, whatever pieces straddle the boundary.
(A response holding the literal text "</s>" or "<s>" is encoded as text here, not as the special token.)

Records: dicts with "instruction" (str), optional "input" (str; a missing key or None means ""), and
"output" (a non-empty str); or chat records with "messages" ([{role, content}, ...]), encoded by
c2a.data.chat under a chat template (loss on the assistant turns). Loaded from .json (a list, or JSON lines), .jsonl, .parquet, or a hub dataset
name through `datasets`. A malformed record stops the load with a `DataError` naming the file and line
(JSON lines) or row index; `skip_bad_rows=True` logs and counts it instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from c2a.data import chat
from c2a.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

Truncation = Literal["truncate", "drop", "right"]
TRUNCATION_POLICIES: tuple[str, ...] = ("truncate", "drop", "right")
TOKENIZATIONS: tuple[str, ...] = ("split", "joint")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


class DataError(ValueError):
    """A data file or record that cannot be used as it is; the message names the file and line/row."""


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The Alpaca prompt for one record (ends with "### Response:"); with template "alpaca-claude2-released",
    the variant is chosen by the instruction instead of the input."""
    if (instruction if template == chat.ALPACA_RELEASED else input) != "":
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass(frozen=True)
class Encoded:
    """One encoded example: `input_ids`/`labels` as in `encode_example`, plus what the policy did."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dropped: bool = False
    prompt_tokens: int = 0  # before truncation, BOS included
    response_tokens: int = 0  # before truncation, EOS included


def encode_example(record: Mapping[str, Any], tokenizer: Tokenizer, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one Alpaca record; over-length examples are truncated (see module doc)."""
    enc = encode_example_full(record, tokenizer, max_len, truncation="truncate")
    return enc.input_ids, enc.labels


def encode_example_full(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    max_len: int,
    truncation: Truncation = "truncate",
    template: str = "auto",
    tokenization: str = "split",
) -> Encoded:
    """`encode_example` with the truncation policy as an argument and what it did reported. `template` (a
    name of chat.TEMPLATE_CHOICES) applies to chat records; Alpaca records use Alpaca's prompt, by the
    released model's rule with "alpaca-claude2-released". `tokenization` (TOKENIZATIONS) is for Alpaca records."""
    if max_len < 4:
        raise ValueError(f"max_len must be at least 4 (BOS, a prompt token, a response token, EOS), got {max_len}")
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation policy {truncation!r}; valid: {', '.join(TRUNCATION_POLICIES)}")
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"unknown tokenization {tokenization!r}; valid: {', '.join(TOKENIZATIONS)}")
    if "messages" in record:
        return _encode_chat(record, tokenizer, max_len, truncation, template)
    prompt, response = _prompt_and_response(record, tokenizer, template, tokenization)
    lp, lr = len(prompt), len(response)
    budget = max_len + 1  # tokens; input_ids and labels are one shorter
    truncated = lp + lr > budget
    if truncated and truncation == "right":
        return _right_truncated(prompt, response, budget)
    if truncated:
        if truncation == "drop":
            return Encoded([], [], truncated=True, dropped=True, prompt_tokens=lp, response_tokens=lr)
        keep_p = min(lp, max(budget - lr, budget // 2))
        keep_r = budget - keep_p
        head = (keep_p + 1) // 2
        prompt = prompt[:head] + prompt[lp - (keep_p - head) :]
        if keep_r < lr:
            response = response[: keep_r - 1] + [tokenizer.eos_id]
    tokens = prompt + response
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + response
    return Encoded(tokens[:-1], labels, truncated=truncated, prompt_tokens=lp, response_tokens=lr)


def _prompt_and_response(
    record: Mapping[str, Any], tokenizer: Tokenizer, template: str, tokenization: str
) -> tuple[list[int], list[int]]:
    """The prompt's tokens (BOS first) and the response's (EOS last) of an Alpaca record."""
    prompt_text = format_prompt(record["instruction"], record.get("input") or "", template)
    prompt = tokenizer.encode(prompt_text, bos=True)
    if tokenization == "joint":
        tokens = tokenizer.encode(prompt_text + record["output"], bos=True) + [tokenizer.eos_id]
        return tokens[: len(prompt)], tokens[len(prompt) :]
    return prompt, tokenizer.encode_continuation(record["output"], eos=True)


def _right_truncated(prompt: list[int], response: list[int], budget: int) -> Encoded:
    """The first `budget` tokens (the tail and the EOS cut off); dropped when no response token is left."""
    lp, lr = len(prompt), len(response)
    tokens = (prompt + response)[:budget]
    if len(tokens) <= lp:
        return Encoded([], [], truncated=True, dropped=True, prompt_tokens=lp, response_tokens=lr)
    labels = [IGNORE_INDEX] * (lp - 1) + tokens[lp:]
    return Encoded(tokens[:-1], labels, truncated=True, prompt_tokens=lp, response_tokens=lr)


def _encode_chat(
    record: Mapping[str, Any], tokenizer: Tokenizer, max_len: int, truncation: Truncation, template: str
) -> Encoded:
    label, source = chat.resolve_template(template, tokenizer)
    tokens, trained = chat.encode_chat(record, tokenizer, source, label)
    n_trained = sum(trained)
    lp, lr = len(tokens) - n_trained, n_trained  # before truncation, as for Alpaca records
    budget = max_len + 1
    truncated = len(tokens) > budget
    if truncated:
        # the head is kept: earlier turns are the context of later ones, and the first answer stays whole
        if truncation == "drop" or not any(trained[1:budget]):  # "right" keeps the head, as "truncate"
            return Encoded([], [], truncated=True, dropped=True, prompt_tokens=lp, response_tokens=lr)
        tokens, trained = tokens[:budget], trained[:budget]
    labels = [t if m else IGNORE_INDEX for t, m in zip(tokens[1:], trained[1:])]
    return Encoded(tokens[:-1], labels, truncated=truncated, prompt_tokens=lp, response_tokens=lr)


# --- records -----------------------------------------------------------------------------------------


def validate_record(row: Any) -> dict[str, Any]:
    """The record as {"instruction", "input", "output"} strings (or a chat record's {"messages": [...]}), or a
    ValueError saying what is wrong."""
    if not isinstance(row, Mapping):
        raise ValueError(f"expected an object with instruction/input/output (or messages), got {type(row).__name__}")
    if "messages" in row:
        return chat.validate_messages(row)
    for key in ("instruction", "output"):
        if key not in row:
            raise ValueError(f"missing field {key!r} (fields present: {', '.join(map(str, row)) or 'none'})")
        if not isinstance(row[key], str):
            raise ValueError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    inp = row.get("input")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise ValueError(f"field 'input' must be a string, got {type(inp).__name__}")
    if not row["output"].strip():
        raise ValueError("field 'output' is empty")
    return {"instruction": row["instruction"], "input": inp, "output": row["output"]}


@dataclass
class LoadedRecords:
    """Validated records and where they came from. `skipped` holds one message per bad row skipped."""

    records: list[dict[str, str]]
    source: dict[str, Any]
    skipped: list[str] = field(default_factory=list)


def is_local_file(source: str | Path) -> bool:
    path = Path(source)
    return path.exists() or path.suffix.lower() in FILE_SUFFIXES


def load_records(
    source: str | Path,
    *,
    skip_bad_rows: bool = False,
    split: str = "train",
    skip_hint: str = "--skip-bad-rows / skip_bad_rows=True",
) -> LoadedRecords:
    """Read and validate Alpaca records from a local .json/.jsonl/.parquet file or a hub dataset name.

    A hub name goes through `datasets.load_dataset(name, split=split)` and needs network or a local cache.
    The returned `source` is what a tokenized cache's manifest records (path + sha256, or name + split).
    `skip_hint` is how the caller's user turns on skipping (the trainer's flag differs from prepare's).
    """
    if is_local_file(source):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        rows, where = _read_file(path)
        info: dict[str, Any] = {"kind": "file", "path": str(path.resolve()), "sha256": file_sha256(path)}
        label = str(path)
    else:
        rows, where = _read_hub(str(source), split)
        info = {"kind": "hub", "name": str(source), "split": split}
        label = f"{source} (split {split})"
    records, skipped = [], []
    for loc, row in zip(where, rows, strict=True):
        try:
            if isinstance(row, _BadRow):
                raise ValueError(row.reason)
            records.append(validate_record(row))
        except ValueError as e:
            msg = f"{label}{loc}: {e}"
            if not skip_bad_rows:
                raise DataError(f"{msg} (pass {skip_hint} to skip such rows)") from None
            skipped.append(msg)
    if skipped:
        log.warning("skipped %d bad row(s) of %s; first: %s", len(skipped), label, skipped[0])
    if not records:
        raise DataError(f"{label}: no usable records")
    return LoadedRecords(records, info, skipped)


@dataclass(frozen=True)
class _BadRow:
    reason: str


def _read_file(path: Path) -> tuple[list[Any], list[str]]:
    """The rows of a file and, for each, its location suffix for messages (":LINE" or " row N")."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: not a readable parquet file: {e}") from e
        return rows, [f" row {i}" for i in range(len(rows))]
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not JSON
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}: {e.reason}); "
            "re-save the file as UTF-8"
        ) from None
    if suffix == ".jsonl":
        return _read_jsonl(text)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if not text.lstrip().startswith("["):  # a .json file holding JSON lines, as `datasets` accepts
            return _read_jsonl(text)
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(rows, dict) and "\n" not in text.strip():  # JSON lines holding a single record
        return _read_jsonl(text)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows, [f" row {i}" for i in range(len(rows))]


def _read_jsonl(text: str) -> tuple[list[Any], list[str]]:
    rows, where = [], []
    # split on "\n" only: str.splitlines() also splits on U+2028, U+2029 and U+0085, which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(_BadRow(f"invalid JSON: {e.msg} (column {e.colno})"))
        where.append(f":{lineno}")
    return rows, where


def _read_hub(name: str, split: str) -> tuple[list[Any], list[str]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, cache and name errors all surface here
        raise DataError(
            f"cannot load dataset {name!r} (split {split}) through `datasets`: {e}; "
            "without network or a local cache, pass a .json/.jsonl/.parquet file"
        ) from e
    rows = list(ds)
    return rows, [f" row {i}" for i in range(len(rows))]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
