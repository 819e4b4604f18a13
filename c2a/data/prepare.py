"""Tokenize an Alpaca or chat data set once into a memory-mapped cache (c2a.data.cache) for training.

    python -m c2a.data.prepare --data FILE|HF_NAME --tokenizer tokenizer.model|tokenizer.json|CHECKPOINT_DIR --out DIR \\
        [--max-len 256] [--truncation truncate|drop|right] [--template auto] [--tokenization split|joint]
        [--skip-bad-rows] [--workers N] [--overwrite]

--max-len, --truncation, --template, --tokenization and --skip-bad-rows mean what data.max_len, data.truncation,
data.template, data.tokenization and data.skip_bad_rows mean to the trainer, with the same defaults: a cache is used by a run
whose settings match it (the claude2-alpaca recipes train at --max-len 2048).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from c2a.config import DataSection
from c2a.data import chat
from c2a.data.alpaca import TOKENIZATIONS, TRUNCATION_POLICIES, load_records
from c2a.data.cache import TokenizedDataset
from c2a.data.tokenizer import Tokenizer
from c2a.errors import USER_ERRORS, report


def build_parser() -> argparse.ArgumentParser:
    defaults = DataSection()
    ap = argparse.ArgumentParser(prog="python -m c2a.data.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", required=True, help="a .json/.jsonl/.parquet file, or a hub dataset name (needs network or a cache)"
    )
    ap.add_argument(
        "--tokenizer",
        required=True,
        help="SentencePiece tokenizer.model, HF tokenizer.json, or a checkpoint directory holding one",
    )
    ap.add_argument("--out", required=True, help="cache directory to write")
    ap.add_argument(
        "--max-len",
        type=int,
        default=defaults.max_len,
        help="maximum input positions per example (tokens - 1), as data.max_len",
    )
    ap.add_argument(
        "--truncation",
        choices=TRUNCATION_POLICIES,
        default=defaults.truncation,
        help="over-length policy, as data.truncation",
    )
    ap.add_argument("--split", default="train", help="split of a hub dataset")
    ap.add_argument(
        "--template",
        default=defaults.template,
        choices=chat.TEMPLATE_CHOICES,
        help="chat template for records with messages: auto (the tokenizer's chat_template, else alpaca), tokenizer, or a built-in",
    )
    ap.add_argument(
        "--skip-bad-rows", action="store_true", help="skip malformed rows with a warning instead of stopping"
    )
    ap.add_argument(
        "--tokenization",
        choices=TOKENIZATIONS,
        default=defaults.tokenization,
        help="Alpaca records: split or joint, as data.tokenization",
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tok = Tokenizer(args.tokenizer)
        loaded = load_records(args.data, skip_bad_rows=args.skip_bad_rows, split=args.split)
        t0 = time.perf_counter()
        ds = TokenizedDataset.from_records(
            loaded.records,
            tok,
            args.max_len,
            truncation=args.truncation,
            workers=args.workers,
            source=loaded.source,
            skipped_bad_rows=len(loaded.skipped),
            template=args.template,
            tokenization=args.tokenization,
        )
        ds.manifest["tokenizer"]["path"] = str(tok.path.resolve())
        elapsed = time.perf_counter() - t0
        out = ds.save(args.out, overwrite=args.overwrite)
    except USER_ERRORS as e:
        return report(e)
    print(f"wrote {out} ({elapsed:.1f} s to tokenize with {args.workers} worker(s))")
    print(ds.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
