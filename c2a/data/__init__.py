"""SFT data: tokenizers (SentencePiece tokenizer.model, HF tokenizer.json), the exact Alpaca prompt template,
chat records under a chat template (c2a.data.chat), example encoding, loading, and the tokenized,
memory-mapped data set (c2a.data.cache).

Batching lives in `c2a.data.batching` (it imports torch), the bundled demo task in `c2a.data.demo`, and a
training config's data in `c2a.data.sources`.
"""

from c2a.data.alpaca import (
    IGNORE_INDEX,
    DataError,
    LoadedRecords,
    encode_example,
    encode_example_full,
    format_prompt,
    load_records,
)
from c2a.data.cache import CacheMismatchError, TokenizedDataset
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
