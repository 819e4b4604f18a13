"""The tokenized data set: examples encoded once into flat arrays, memory-mapped from a cache directory.

`python -m c2a.data.prepare` writes a cache; the trainer writes one into out_dir/data_cache. Cache layout
(format version 1), written to a temporary directory and renamed into place, so a crash never leaves a
half-written cache under DIR:
    input_ids.npy  int32 [total tokens]   all examples' input_ids, concatenated
    labels.npy     int32 [total tokens]   their labels (-100 = not trained)
    offsets.npy    int64 [examples + 1]   example i is [offsets[i], offsets[i+1])
    manifest.json  format_version, source (path + sha256, or hub name + split), tokenizer (sha256,
                   vocab_size, bos/eos), max_len, truncation, counts, length percentiles

`TokenizedDataset.open(DIR, expect_tokenizer=..., expect_max_len=..., expect_source=...)` maps the arrays
and refuses a cache whose manifest does not match what the run expects. `TokenizedDataset.from_records`
builds the same object in memory (the demo task needs no CLI step).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from c2a.data import chat
from c2a.data.alpaca import (
    IGNORE_INDEX,
    DataError,
    Encoded,
    Truncation,
    encode_example_full,
    file_sha256,
    is_local_file,
)
from c2a.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = ("input_ids", "labels", "offsets")


class CacheMismatchError(ValueError):
    """A tokenized cache built from other data, another tokenizer or another max_len than the run's."""


class TokenizedDataset:
    """Encoded examples as flat arrays: example i is `input_ids[offsets[i]:offsets[i+1]]` (and labels).

    `ds[i]` returns (input_ids, labels) as int32 numpy arrays; `ds.lengths` is every example's length.
    The arrays are memory-mapped when opened from a cache, so every data-parallel rank can open the same
    directory without holding a copy.
    """

    def __init__(
        self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, manifest: dict[str, Any]
    ) -> None:
        if input_ids.shape != labels.shape or offsets[0] != 0 or offsets[-1] != len(input_ids):
            raise ValueError(
                f"inconsistent tokenized arrays: input_ids {input_ids.shape}, labels {labels.shape}, "
                f"offsets [{offsets[0]} .. {offsets[-1]}]"
            )
        self.input_ids, self.labels, self.offsets, self.manifest = input_ids, labels, offsets, manifest
        self.lengths: np.ndarray = np.diff(offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b]

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    @classmethod
    def from_records(
        cls,
        records: Sequence[dict[str, str]],
        tokenizer: Tokenizer | str | Path,
        max_len: int,
        *,
        truncation: Truncation = "truncate",
        workers: int = 1,
        source: dict[str, Any] | None = None,
        skipped_bad_rows: int = 0,
        template: str = "auto",
        tokenization: str = "split",
    ) -> TokenizedDataset:
        """Encode validated records in memory (with `workers` processes when > 1). `template` names the chat
        template of chat records (c2a.data.chat.TEMPLATE_CHOICES); Alpaca records use Alpaca's prompt, by the
        released claude2-alpaca rule under "alpaca-claude2-released". `tokenization`: c2a.data.alpaca's."""
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        if template not in chat.TEMPLATE_CHOICES:
            raise ValueError(f"unknown chat template {template!r}; valid: {', '.join(chat.TEMPLATE_CHOICES)}")
        chat_template = None
        if any("messages" in r for r in records):
            label, body = chat.resolve_template(template, tok)
            chat_template = {"name": label, "sha256": chat.template_sha256(body)}
            log.info("chat records rendered with %s", label)
        encoded = _encode_all(records, tok, max_len, truncation, workers, (template, tokenization))
        kept = [e for e in encoded if not e.dropped]
        if not kept:
            raise DataError(f"all {len(records)} examples exceed max_len={max_len} and were dropped")
        lengths = np.fromiter((len(e.input_ids) for e in kept), dtype=np.int64, count=len(kept))
        offsets = np.zeros(len(kept) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        input_ids = np.concatenate([np.asarray(e.input_ids, dtype=np.int32) for e in kept])
        labels = np.concatenate([np.asarray(e.labels, dtype=np.int32) for e in kept])
        trained = int((labels != IGNORE_INDEX).sum())
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source or {"kind": "records"},
            "tokenizer": {
                "sha256": tok.sha256,
                "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
            },
            "max_len": max_len,
            "truncation": truncation,
            **({"chat_template": chat_template} if chat_template else {}),
            **({"alpaca_encoding": encoding} if (encoding := alpaca_encoding(template, tokenization)) else {}),
            "counts": {
                "records": len(records) + skipped_bad_rows,
                "skipped_bad_rows": skipped_bad_rows,
                "examples": len(kept),
                "truncated": sum(e.truncated and not e.dropped for e in encoded),
                "dropped": len(encoded) - len(kept),
                "tokens": int(offsets[-1]),
                "trained_tokens": trained,
            },
            "lengths": _percentiles(lengths),
            "prompt_lengths": _percentiles(np.array([e.prompt_tokens for e in encoded])),
            "response_lengths": _percentiles(np.array([e.response_tokens for e in encoded])),
        }
        return cls(input_ids, labels, offsets, manifest)

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write the cache atomically: a temporary directory beside `out`, renamed into place."""
        out = Path(out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by every rank and user
        try:
            for name, array in ((name, getattr(self, name)) for name in ARRAYS):
                _write_synced(tmp / f"{name}.npy", lambda f, a=array: np.save(f, a, allow_pickle=False))
            manifest = dict(self.manifest, created_unix=int(time.time()))
            _write_synced(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode() + b"\n"))
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, old / out.name)
                os.rename(tmp, out)
                shutil.rmtree(old)
            else:
                os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expect_tokenizer: Tokenizer | str | Path | None = None,
        expect_max_len: int | None = None,
        expect_source: str | Path | None = None,
        expect_truncation: str | None = None,
        expect_template: str | None = None,
        expect_encoding: dict[str, str] | None = None,
        hint: str = "Rebuild it with python -m c2a.data.prepare (or point to the right cache).",
    ) -> TokenizedDataset:
        """Map a cache written by `prepare`; raise `CacheMismatchError` if it was built differently than expected.

        `expect_tokenizer` (a Tokenizer, or a path Tokenizer reads) is compared by its sha256, `expect_max_len`
        exactly, `expect_source` (a local file, compared by sha256, or a hub name) against the manifest,
        `expect_truncation` exactly, `expect_template` (a data.template choice, resolved with `expect_tokenizer`)
        by the sha256 of the chat template the cache's chat records were rendered with (a cache without chat
        records has none to compare), `expect_encoding` (`alpaca_encoding`'s) exactly. `hint` ends the mismatch
        message: what the caller's user should do.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{path} is not a tokenized cache (no {MANIFEST}); build one with python -m c2a.data.prepare"
            )
        manifest = json.loads(mpath.read_text())
        problems = []
        if manifest.get("format_version") != FORMAT_VERSION:
            problems.append(f"format_version is {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
        if expect_tokenizer is not None:
            sha = (expect_tokenizer if isinstance(expect_tokenizer, Tokenizer) else Tokenizer(expect_tokenizer)).sha256
            if manifest["tokenizer"]["sha256"] != sha:
                problems.append(
                    f"tokenizer sha256 is {manifest['tokenizer']['sha256'][:12]}..., expected {sha[:12]}... ({expect_tokenizer})"
                )
        if expect_max_len is not None and manifest["max_len"] != expect_max_len:
            problems.append(f"max_len is {manifest['max_len']}, expected {expect_max_len}")
        if expect_source is not None:
            problems += _source_problems(manifest["source"], expect_source)
        if expect_truncation is not None and manifest.get("truncation") != expect_truncation:
            problems.append(f"truncation is {manifest.get('truncation')!r}, expected {expect_truncation!r}")
        if expect_encoding is not None and manifest.get("alpaca_encoding", {}) != expect_encoding:
            problems.append(
                f"Alpaca records were encoded with {manifest.get('alpaca_encoding', {}) or 'the defaults'}, "
                f"expected {expect_encoding or 'the defaults'}"
            )
        recorded = manifest.get("chat_template")
        if expect_template is not None and expect_tokenizer is not None and recorded is not None:
            tok = expect_tokenizer if isinstance(expect_tokenizer, Tokenizer) else Tokenizer(expect_tokenizer)
            label, body = chat.resolve_template(expect_template, tok)
            if recorded["sha256"] != chat.template_sha256(body):
                problems.append(
                    f"chat records were rendered with {recorded['name']} (sha256 {recorded['sha256'][:12]}...), "
                    f"expected {label} (sha256 {chat.template_sha256(body)[:12]}...)"
                )
        if problems:
            raise CacheMismatchError(
                f"tokenized cache {path} does not match this run: " + "; ".join(problems) + ". " + hint
            )
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS}
        return cls(arrays["input_ids"], arrays["labels"], arrays["offsets"], manifest)

    def summary(self) -> str:
        c, m = self.manifest["counts"], self.manifest
        lines = [
            f"examples        {c['examples']:>12,}   (records {c['records']:,}, bad rows skipped {c['skipped_bad_rows']:,})",
            f"tokens          {c['tokens']:>12,}   (input positions)",
            f"trained tokens  {c['trained_tokens']:>12,}   ({c['trained_tokens'] / max(c['tokens'], 1):.1%} of tokens)",
            f"truncated       {c['truncated']:>12,}   dropped {c['dropped']:,}   (max_len {m['max_len']}, policy {m['truncation']})",
        ]
        for key, name in (
            ("lengths", "example length"),
            ("prompt_lengths", "prompt tokens"),
            ("response_lengths", "response tokens"),
        ):
            p = m[key]
            lines.append(
                f"{name:<16}mean {p['mean']:.1f}  p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}"
            )
        return "\n".join(lines)


def _source_problems(recorded: dict[str, Any], expect: str | Path) -> list[str]:
    if is_local_file(expect):
        if recorded.get("kind") != "file":
            return [f"source is {recorded}, expected the file {expect}"]
        sha = file_sha256(expect)
        if recorded["sha256"] != sha:
            return [
                f"source file sha256 is {recorded['sha256'][:12]}... ({recorded['path']}), expected {sha[:12]}... ({expect})"
            ]
        return []
    if recorded.get("kind") != "hub" or recorded.get("name") != str(expect):
        return [f"source is {recorded}, expected the hub dataset {expect!r}"]
    return []


def _percentiles(x: np.ndarray) -> dict[str, float | int]:
    if len(x) == 0:
        return {"mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = (int(v) for v in np.percentile(x, [50, 90, 99], method="nearest"))
    return {"mean": round(float(x.mean()), 2), "p50": p50, "p90": p90, "p99": p99, "max": int(x.max())}


def _write_synced(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# --- parallel encoding ---------------------------------------------------------------------------------

_worker_state: dict[str, Any] = {}


def alpaca_encoding(template: str, tokenization: str) -> dict[str, str]:
    """What a cache records of how its Alpaca records were encoded, where not the defaults (so caches made
    before these settings existed still match): the released template rule, the joint tokenization."""
    return {
        **({"template": template} if template == chat.ALPACA_RELEASED else {}),
        **({"tokenization": tokenization} if tokenization != "split" else {}),
    }


def _worker_init(tokenizer_path: str, max_len: int, truncation: str, template: tuple[str, str]) -> None:
    _worker_state.update(tok=Tokenizer(tokenizer_path), max_len=max_len, truncation=truncation, template=template)


def _worker_encode(chunk: tuple[int, list[dict[str, Any]]]) -> list[Encoded]:
    s = _worker_state
    return _encode_chunk(chunk[0], chunk[1], s["tok"], s["max_len"], s["truncation"], s["template"])


def _encode_chunk(
    first: int,
    records: Sequence[dict[str, Any]],
    tok: Tokenizer,
    max_len: int,
    truncation: Truncation,
    encoding: tuple[str, str],
) -> list[Encoded]:
    """`encoding`: (template, tokenization)."""
    out = []
    for i, r in enumerate(records, start=first):
        try:
            out.append(encode_example_full(r, tok, max_len, truncation, *encoding))
        except chat.ChatTemplateError as e:  # a conversation the template refuses: name the record
            raise DataError(f"record {i} (0-based, of the records kept): {e}") from None
    return out


def _encode_all(
    records: Sequence[dict[str, Any]],
    tok: Tokenizer,
    max_len: int,
    truncation: Truncation,
    workers: int,
    template: tuple[str, str] = ("auto", "split"),
) -> list[Encoded]:
    if workers <= 1 or len(records) < 2000:
        return _encode_chunk(0, records, tok, max_len, truncation, template)
    chunk = 500
    chunks = [(i, list(records[i : i + chunk])) for i in range(0, len(records), chunk)]
    # fork where available: workers inherit the imported modules instead of re-importing them
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ctx.Pool(workers, initializer=_worker_init, initargs=(str(tok.path), max_len, truncation, template)) as pool:
        return [e for part in pool.imap(_worker_encode, chunks) for e in part]
