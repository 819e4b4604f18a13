"""Tokenizers: a SentencePiece `tokenizer.model` (Meta's Llama-2, the demo task's) or an HF `tokenizer.json`
(Llama-3, TinyLlama, SmolLM, Mistral: read with the `tokenizers` library), behind one contract.

`Tokenizer(path)` takes either file, or a checkpoint directory (`find_tokenizer`: tokenizer.model first, as
Llama-2's HF directories hold both and c2a's caches were made with it, else tokenizer.json). A tokenizer.json
takes its BOS/EOS from tokenizer_config.json (or special_tokens_map.json) beside it, as transformers does.

The vocabulary is used exactly as the model has it: no pad token is added (padding positions are masked
with label -100 and never need an embedding of their own).

Continuations. SentencePiece prepends a "dummy prefix" space (U+2581) to every text it encodes, so
`encode(prompt) + encode(response)` would decode as `prompt + " " + response`. Alpaca's template puts the
response right after "### Response:" with no separator, so the response must be encoded as a
continuation: `encode_continuation` runs a second processor built from the same model proto with
`normalizer_spec.add_dummy_prefix` switched off. Its pieces and ids are the same; only the leading space
is gone, so `decode(encode(prompt) + encode_continuation(response)) == prompt + response` exactly (tested
with Meta's tokenizer over many records). The proto is edited at the protobuf wire level because the
python `protobuf` package is not a dependency. A tokenizer.json gets the same treatment on its JSON: a
`Prepend("▁")` normalizer is removed, a Metaspace pre-tokenizer set to prepend nothing, a ByteLevel one to
add no prefix space (Llama-3's byte-level BPE has none to begin with).

Special tokens: `encode` never lets the tokenizer add any (its post-processor would add a second BOS to
Llama-3 text); BOS and EOS are added by the caller's flags. Text that spells a special token ("<|eot_id|>"
typed in a record) is encoded as plain text, as SentencePiece does with "</s>", so data cannot inject an EOS;
chat templates, whose rendered text holds special tokens on purpose, split them out first
(`special_tokens`, c2a.data.chat). `decode` drops BOS and EOS (as SentencePiece drops its control pieces)
and keeps other special tokens as their text.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import sentencepiece as spm

# ModelProto field 3 is normalizer_spec; inside it, field 3 is add_dummy_prefix (bool, default true).
# Source: sentencepiece/src/sentencepiece_model.proto.
_MODEL_NORMALIZER_SPEC = 3
_NORMALIZER_ADD_DUMMY_PREFIX = 3
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in the order a checkpoint directory is searched
HF_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# transformers' own file for a chat template (what save_pretrained writes since 4.47); when present it wins
# over tokenizer_config.json's chat_template, in transformers and here
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def find_tokenizer(directory: str | Path) -> Path | None:
    """The tokenizer file of a checkpoint directory: tokenizer.model, else tokenizer.json, else None."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def export_tokenizer(path: str | Path, out_dir: str | Path) -> list[str]:
    """Copies a tokenizer into an exported model directory, under the names a checkpoint directory uses;
    returns the names written. The one copier of tokenizer files (the trainer's export, `c2a.model.convert`).

    `path` a file: a SentencePiece model as tokenizer.model; a tokenizer.json with its config files and chat
    template beside it. `path` a checkpoint directory: every tokenizer file it holds (tokenizer.model,
    tokenizer.json, their config files, chat_template.jinja), so a converted checkpoint keeps them all."""
    path, out_dir = Path(path), Path(out_dir)
    side_files = (*HF_TOKENIZER_SIDE_FILES, CHAT_TEMPLATE_FILE)
    if path.is_dir():
        resolve_tokenizer_file(path)  # a directory without a tokenizer is named, not silently skipped
        files = {n: path / n for n in (*TOKENIZER_FILES, *side_files) if (path / n).is_file()}
    else:
        tok_file = resolve_tokenizer_file(path)
        if tok_file.suffix != ".json":
            files = {"tokenizer.model": tok_file}
        else:
            files = {"tokenizer.json": tok_file} | {
                n: tok_file.parent / n for n in side_files if (tok_file.parent / n).is_file()
            }
    for name, src in files.items():
        shutil.copyfile(src, out_dir / name)
    if "tokenizer.json" in files:
        _fill_special_ids(out_dir / "tokenizer.json", out_dir / "config.json")
    return list(files)


def _fill_special_ids(tokenizer_json: Path, config: Path) -> None:
    """transformers' generate stops at config.json's eos_token_id. The ids config.json already holds are the
    model's (its source checkpoint's, which may list several EOS ids: c2a.model.weights.with_tokenizer_ids);
    the tokenizer's BOS / EOS only fill a key that is absent or null."""
    if not config.is_file():
        return
    tok = HFTokenizer(tokenizer_json)
    raw = json.loads(config.read_text())
    fill = {k: v for k, v in {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}.items() if raw.get(k) is None}
    if fill:
        config.write_text(json.dumps(raw | fill, indent=2) + "\n")


def resolve_tokenizer_file(path: str | Path) -> Path:
    """`path` itself if it is a file, else the tokenizer file of the directory it names."""
    path = Path(path)
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json in the directory")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    return path


class Tokenizer:
    """`Tokenizer(path)` is the tokenizer in `path` (a tokenizer.model, a tokenizer.json, or a checkpoint
    directory holding one): a SentencePieceTokenizer or an HFTokenizer, which share this contract:
    `path`, `files` (what an export copies), `sha256` (the identity a tokenized cache records), `bos_id`,
    `eos_id`, `bos_token`, `eos_token`, `vocab_size`, `chat_template` (chat_template.jinja's, else
    tokenizer_config.json's, else None) and `chat_template_file` (where it came from),
    `special_tokens` (text -> id: BOS, EOS, and a tokenizer.json's other special added tokens),
    `encode`, `encode_continuation`, `decode`, `decode_continuation`, `piece`, `pieces`, `unk_count`."""

    path: Path
    files: list[Path]
    sha256: str
    bos_id: int
    eos_id: int
    vocab_size: int
    chat_template: str | None
    chat_template_file: Path | None
    special_tokens: dict[str, int]

    def __new__(cls, path: str | Path) -> Tokenizer:
        if cls is Tokenizer:
            cls = HFTokenizer if resolve_tokenizer_file(path).suffix == ".json" else SentencePieceTokenizer
        return super().__new__(cls)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"
        )

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode_continuation(self, prefix_ids: list[int], new_ids: list[int]) -> str:
        """The text that `new_ids` adds after `prefix_ids` (exact where `decode(new_ids)` alone would drop
        a leading space of the first new piece)."""
        prefix = self.decode(prefix_ids)
        full = self.decode(list(prefix_ids) + list(new_ids))
        return full[len(prefix) :] if full.startswith(prefix) else self.decode(new_ids)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with BOS/EOS handling and exact continuation encoding.

    `encode(text, bos=True, eos=False)` follows the Llama convention (BOS prepended, no EOS);
    `decode(ids)` drops control tokens (BOS/EOS) as SentencePiece does.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_tokenizer_file(path)
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
            raise ValueError(
                f"{self.path}: the model has no BOS/EOS piece (bos_id={self.bos_id}, eos_id={self.eos_id})"
            )
        self.files: list[Path] = [self.path]  # what an export copies beside the weights
        self.chat_template, self.chat_template_file = _chat_template(self.path.parent)
        self.special_tokens: dict[str, int] = {self.bos_token: self.bos_id, self.eos_token: self.eos_id}

    @property
    def bos_token(self) -> str:
        return self.piece(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self.piece(self.eos_id)

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text` as the start of a document (with SentencePiece's dummy-prefix space)."""
        ids = self._sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_continuation(self, text: str, *, eos: bool = False) -> list[int]:
        """Ids of `text` as it continues a previous text: no dummy-prefix space is inserted."""
        return self._sp_continuation.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def pieces(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)

    def unk_count(self, ids: list[int]) -> int:
        """How many ids are the unknown piece (text outside the model's alphabet without byte fallback)."""
        return sum(1 for i in ids if self._sp.is_unknown(i))


class HFTokenizer(Tokenizer):
    """An HF tokenizer.json through the `tokenizers` library, with SentencePieceTokenizer's contract."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tokenizers  # imported here: SentencePiece-only users never need it

        self.path = resolve_tokenizer_file(path)
        raw = self.path.read_bytes()
        try:
            spec = json.loads(raw)
            self._tok = _Tokenizers.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise ValueError(f"{self.path} is not an HF tokenizer.json: {e}") from e
        self._continuation = _Tokenizers.from_str(json.dumps(_without_prefix_space(spec)))
        for tok in (self._tok, self._continuation):
            tok.encode_special_tokens = True  # text is text: "<|eot_id|>" typed in a record is not the token
        side = (*HF_TOKENIZER_SIDE_FILES, CHAT_TEMPLATE_FILE)
        self.files = [self.path] + [self.path.parent / n for n in side if (self.path.parent / n).is_file()]
        self.bos_token, self.eos_token = _special_token(self.path, "bos_token"), _special_token(self.path, "eos_token")
        self.bos_id, self.eos_id = (
            self._token_id("bos_token", self.bos_token),
            self._token_id("eos_token", self.eos_token),
        )
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        # identity of what encoding depends on: the tokenizer and the BOS/EOS it is used with
        self.sha256 = hashlib.sha256(raw + json.dumps([self.bos_token, self.eos_token]).encode()).hexdigest()
        unk = (spec.get("model") or {}).get("unk_token")
        self._unk_id = self._tok.token_to_id(unk) if isinstance(unk, str) else None
        self.chat_template, self.chat_template_file = _chat_template(self.path.parent)
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        } | {self.bos_token: self.bos_id, self.eos_token: self.eos_id}

    def _token_id(self, key: str, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{self.path}: {key} {token!r} (from {self.path.parent / 'tokenizer_config.json'}) is not in the vocabulary"
            )
        return token_id

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text` as the start of a document (with the tokenizer's prefix space, if it has one)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_continuation(self, text: str, *, eos: bool = False) -> list[int]:
        """Ids of `text` as it continues a previous text: no prefix space is inserted."""
        return self._continuation.encode(text, add_special_tokens=False).ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in (self.bos_id, self.eos_id)], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def pieces(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def unk_count(self, ids: list[int]) -> int:
        """How many ids are the unknown token (0 for byte-level BPE, which has none)."""
        return 0 if self._unk_id is None else sum(1 for i in ids if i == self._unk_id)


def _side_json(directory: Path, name: str) -> dict[str, Any]:
    path = directory / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _special_token(path: Path, key: str) -> str:
    """BOS or EOS of a tokenizer.json: tokenizer_config.json's, else special_tokens_map.json's (a string, or
    an AddedToken object with "content")."""
    for name in HF_TOKENIZER_SIDE_FILES:
        value = _side_json(path.parent, name).get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    raise ValueError(
        f"{path}: no {key} in {' or '.join(str(path.parent / n) for n in HF_TOKENIZER_SIDE_FILES)}; "
        f"c2a needs the {key[:3].upper()} token of the model"
    )


def _chat_template(directory: Path) -> tuple[str | None, Path | None]:
    """(the chat template, its file): chat_template.jinja if the directory has one (transformers' precedence),
    else tokenizer_config.json's chat_template (a string, or a list of {name, template}: its "default" one)."""
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), jinja
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{jinja}: cannot be read as UTF-8 text ({e})") from e
    template = _side_json(directory, "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"{directory / 'tokenizer_config.json'}: chat_template must be a string, got {type(template).__name__}"
        )
    return template, directory / "tokenizer_config.json" if template is not None else None


def _without_prefix_space(spec: Any) -> Any:
    """A tokenizer.json spec whose normalizer and pre-tokenizer add no leading space (see module doc)."""
    if isinstance(spec, list):
        return [_without_prefix_space(s) for s in spec if not (isinstance(s, dict) and s.get("type") == "Prepend")]
    if not isinstance(spec, dict):
        return spec
    out = {
        k: (_without_prefix_space(v) if k in ("normalizer", "normalizers", "pre_tokenizer", "pretokenizers") else v)
        for k, v in spec.items()
    }
    if out.get("type") == "Prepend":
        return None  # a top-level Prepend normalizer: no normalizer at all
    if out.get("type") == "Metaspace":
        out["prepend_scheme"] = "never"
        out.pop("add_prefix_space", None)
    if out.get("type") == "ByteLevel" and "add_prefix_space" in out:
        out["add_prefix_space"] = False
    return out


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
    return raw[pos : pos + length]


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
