"""Alpaca SFT data: tokenizer, the exact prompt template, example encoding, loading, tokenized caches.

Batching lives in `c2a.data.batching` (it imports torch) and the bundled demo task in `c2a.data.demo`.
"""

from c2a.data.alpaca import IGNORE_INDEX, DataError, LoadedRecords, encode_example, encode_example_full, format_prompt, load_records
from c2a.data.prepare import CacheMismatchError, TokenizedDataset
from c2a.data.tokenizer import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "CacheMismatchError",
    "DataError",
    "LoadedRecords",
    "TokenizedDataset",
    "Tokenizer",
    "encode_example",
    "encode_example_full",
    "format_prompt",
    "load_records",
]
