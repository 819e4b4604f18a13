"""A training config's data: its tokenizer file and its training set, resolved and tokenized.

The trainer (c2a.train.run_data) and the planner (c2a.plan) read a config's data through these functions,
so both tokenize exactly the same examples.
"""

from __future__ import annotations

from pathlib import Path

from c2a.config import TrainConfig
from c2a.data.alpaca import load_records
from c2a.data.cache import TokenizedDataset
from c2a.data.demo import DEMO_TOKENIZER, demo_split
from c2a.data.tokenizer import Tokenizer, find_tokenizer
from c2a.errors import ConfigError

# How the trainer's user turns on skipping bad rows (load_records names it in its error)
SKIP_HINT = "--data.skip_bad_rows=true"


def resolve_tokenizer(cfg: TrainConfig) -> Path:
    """data.tokenizer; else the demo's for the demo task; else the checkpoint's tokenizer.model (else its
    tokenizer.json)."""
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
    elif cfg.data.is_demo:
        path = DEMO_TOKENIZER
    elif cfg.model.checkpoint and find_tokenizer(cfg.model.checkpoint) is not None:
        path = find_tokenizer(cfg.model.checkpoint)
    else:
        raise ConfigError(
            "no tokenizer: set data.tokenizer to a SentencePiece tokenizer.model or an HF tokenizer.json "
            "(the model's own: Llama-2's tokenizer.model for Llama-2 weights)"
        )
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: {path} does not exist")
    return path


def demo_dataset(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[TokenizedDataset, list[dict[str, str]]]:
    """The demo task's training split, tokenized in memory, and its held-out records (for exact match)."""
    records, heldout = demo_split(cfg.data.demo_train_size, cfg.data.demo_heldout_size)
    ds = TokenizedDataset.from_records(
        records,
        tokenizer,
        cfg.data.max_len,
        truncation=cfg.data.truncation,
        source={"kind": "demo"},
        template=cfg.data.template,
        tokenization=cfg.data.tokenization,
    )
    return ds, heldout


def tokenize_records_file(
    cfg: TrainConfig, tokenizer: Tokenizer, workers: int, path: str = "", template: str = ""
) -> TokenizedDataset:
    """data.path (a local file or a hub dataset name) read, validated and tokenized as the run trains on it;
    `path` and `template` (a [[data.mix]] source's) instead of data.path and data.template where given."""
    loaded = load_records(path or cfg.data.path, skip_bad_rows=cfg.data.skip_bad_rows, skip_hint=SKIP_HINT)
    return TokenizedDataset.from_records(
        loaded.records,
        tokenizer,
        cfg.data.max_len,
        truncation=cfg.data.truncation,
        workers=workers,
        source=loaded.source,
        skipped_bad_rows=len(loaded.skipped),
        template=template or cfg.data.template,
        tokenization=cfg.data.tokenization,
    )
