"""SFT data: tokenizers (SentencePiece tokenizer.model, HF tokenizer.json), the exact Alpaca prompt template,
chat records under a chat template (c2a.data.chat), example encoding, loading, tokenized caches.

Batching lives in `c2a.data.batching` (it imports torch) and the bundled demo task in `c2a.data.demo`.
"""

from typing import Any

from c2a.data.alpaca import IGNORE_INDEX, DataError, LoadedRecords, encode_example, encode_example_full, format_prompt, load_records
from c2a.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, find_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "CacheMismatchError",
    "DataError",
    "HFTokenizer",
    "LoadedRecords",
    "SentencePieceTokenizer",
    "TokenizedDataset",
    "Tokenizer",
    "encode_example",
    "encode_example_full",
    "find_tokenizer",
    "format_prompt",
    "load_records",
]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m c2a.data.prepare` does not find its own module already
    # imported by the package (runpy warns about that).
    if name in ("TokenizedDataset", "CacheMismatchError"):
        from c2a.data import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module 'c2a.data' has no attribute {name!r}")
