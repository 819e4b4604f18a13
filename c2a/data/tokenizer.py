"""SentencePiece tokenizer wrapper: Meta's Llama-2 `tokenizer.model`, or the demo task's.

The vocabulary is used exactly as the model has it: no pad token is added (padding positions are masked
with label -100 and never need an embedding of their own).

Continuations. SentencePiece prepends a "dummy prefix" space (U+2581) to every text it encodes, so
`encode(prompt) + encode(response)` would decode as `prompt + " " + response`. Alpaca's template puts the
response right after "### Response:" with no separator, so the response must be encoded as a
continuation: `encode_continuation` runs a second processor built from the same model proto with
`normalizer_spec.add_dummy_prefix` switched off. Its pieces and ids are the same; only the leading space
is gone, so `decode(encode(prompt) + encode_continuation(response)) == prompt + response` exactly (tested
with Meta's tokenizer over many records). The proto is edited at the protobuf wire level because the
python `protobuf` package is not a dependency.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import sentencepiece as spm

# ModelProto field 3 is normalizer_spec; inside it, field 3 is add_dummy_prefix (bool, default true).
# Source: sentencepiece/src/sentencepiece_model.proto.
_MODEL_NORMALIZER_SPEC = 3
_NORMALIZER_ADD_DUMMY_PREFIX = 3
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class Tokenizer:
    """A SentencePiece model with BOS/EOS handling and exact continuation encoding.

    `encode(text, bos=True, eos=False)` follows the Llama convention (BOS prepended, no EOS);
    `decode(ids)` drops control tokens (BOS/EOS) as SentencePiece does.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        proto = self.path.read_bytes()
        self.sha256 = hashlib.sha256(proto).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path} is not a SentencePiece model: {e}") from e
        self._sp_continuation = spm.SentencePieceProcessor()
        self._sp_continuation.LoadFromSerializedProto(_without_dummy_prefix(proto))
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.vocab_size: int = self._sp.vocab_size()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.path}: the model has no BOS/EOS piece (bos_id={self.bos_id}, eos_id={self.eos_id})")

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text` as the start of a document (with SentencePiece's dummy-prefix space)."""
        ids = self._sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_continuation(self, text: str, *, eos: bool = False) -> list[int]:
        """Ids of `text` as it continues a previous text: no dummy-prefix space is inserted."""
        return self._sp_continuation.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def decode_continuation(self, prefix_ids: list[int], new_ids: list[int]) -> str:
        """The text that `new_ids` adds after `prefix_ids` (exact where `decode(new_ids)` alone would drop
        a leading space of the first new piece)."""
        prefix = self.decode(prefix_ids)
        full = self.decode(list(prefix_ids) + list(new_ids))
        return full[len(prefix):] if full.startswith(prefix) else self.decode(new_ids)

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def pieces(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)

    def unk_count(self, ids: list[int]) -> int:
        """How many ids are the unknown piece (text outside the model's alphabet without byte fallback)."""
        return sum(1 for i in ids if self._sp.is_unknown(i))


# --- protobuf wire format, just enough to flip one bool ------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in SentencePiece model proto")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _write_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, int, bytes]]:
    """Split a message into (field number, wire type, raw bytes of the whole field incl. its tag)."""
    fields, pos = [], 0
    while pos < len(buf):
        start = pos
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in SentencePiece model proto")
        if pos > len(buf):
            raise ValueError("truncated field in SentencePiece model proto")
        fields.append((number, wire, buf[start:pos]))
    return fields


def _len_payload(raw: bytes) -> bytes:
    _, pos = _read_varint(raw, 0)
    length, pos = _read_varint(raw, pos)
    return raw[pos:pos + length]


def _without_dummy_prefix(proto: bytes) -> bytes:
    """The same ModelProto with normalizer_spec.add_dummy_prefix = false."""
    out, seen = bytearray(), False
    for number, wire, raw in _fields(proto):
        if number == _MODEL_NORMALIZER_SPEC and wire == _LEN:
            seen = True
            spec = b"".join(r for n, _, r in _fields(_len_payload(raw)) if n != _NORMALIZER_ADD_DUMMY_PREFIX)
            spec += _write_varint(_NORMALIZER_ADD_DUMMY_PREFIX << 3 | _VARINT) + b"\x00"
            raw = _write_varint(_MODEL_NORMALIZER_SPEC << 3 | _LEN) + _write_varint(len(spec)) + spec
        out += raw
    if not seen:  # an absent spec means all defaults, so add one that only turns the prefix off
        spec = _write_varint(_NORMALIZER_ADD_DUMMY_PREFIX << 3 | _VARINT) + b"\x00"
        out += _write_varint(_MODEL_NORMALIZER_SPEC << 3 | _LEN) + _write_varint(len(spec)) + spec
    return bytes(out)
