"""Checkpoint import and export: HF safetensors directories and Meta's consolidated.NN shards.

Inside c2a every tensor keeps Meta's name and Meta's interleaved-pair rotary layout. HF checkpoints use
the rotate-half layout, so their q/k projection rows are permuted per head; that permutation is applied
and undone here and nowhere else (with n_kv_heads heads for wk: permuting wk with n_heads is the classic
GQA conversion bug).

Reading is lazy: `CheckpointReader.get(name)` maps one tensor (safetensors and `.pth` files are
memory-mapped), so a trainer can copy each tensor into its shard without any rank holding the whole model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from c2a.config import LlamaConfig, meta_ffn_hidden_dim
from c2a.model.llama import Llama

log = logging.getLogger(__name__)

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3

# c2a (Meta) name suffix -> HF name suffix, for the tensors of block N.
_BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_TO_BLOCK = {v: k for k, v in _BLOCK_NAMES.items()}
_HF_TO_TOP = {v: k for k, v in _TOP_NAMES.items()}
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BLOCK_RE = re.compile(r"layers\.(\d+)\.(.+)")

# Meta's model-parallel layout (fairscale): how each tensor was split across consolidated.NN shards.
_META_CAT_DIM0 = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "output.weight",
)
_META_CAT_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
_META_IGNORED = ("rope.freqs",)  # a buffer of the original code, recomputed by c2a


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file and tensor."""


def hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise KeyError(f"no HF name for c2a tensor {name!r}")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"


def c2a_name(hf: str) -> str | None:
    """The c2a name of an HF tensor, or None if it is not part of a Llama."""
    if hf in _HF_TO_TOP:
        return _HF_TO_TOP[hf]
    m = _HF_BLOCK_RE.fullmatch(hf)
    if m is None or m.group(2) not in _HF_TO_BLOCK:
        return None
    return f"layers.{m.group(1)}.{_HF_TO_BLOCK[m.group(2)]}"


def to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved pairs -> HF's rotate-half: per head, rows (x0, x1, x0, x1, ...) -> (x0..., x1...)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def from_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a c2a Llama with its shape, in state-dict order."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in Llama(cfg).named_parameters()}


# --------------------------------------------------------------------------------------------- reading


class CheckpointReader:
    """A lazy view of an HF or Meta checkpoint directory in c2a's names and layout.

    `config` is the model's LlamaConfig; `names` lists the tensors; `get(name)` reads one tensor.
    `named_ids` holds the special-token keys the checkpoint itself names (an HF config.json's non-null
    bos_token_id / eos_token_id; none for Meta's params.json): see `with_tokenizer_ids`.
    Construction validates the whole directory (files present, every expected tensor present with the
    expected shape, nothing unexpected) before any tensor data is read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected an HF or Meta checkpoint directory)")
        if (self.path / "config.json").is_file():
            self.format = "hf"
            self.config, self._where = self._open_hf()
        elif (self.path / "params.json").is_file():
            self.format = "meta"
            self.config, self._where = self._open_meta()
        else:
            raise CheckpointError(
                f"{self.path}: neither an HF checkpoint (config.json + *.safetensors) nor a Meta checkpoint "
                f"(params.json + consolidated.NN.pth); found: {sorted(p.name for p in self.path.iterdir())[:20]}"
            )
        self._validate()

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._get_hf(name) if self.format == "hf" else self._get_meta(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.get(name)

    def dtype(self) -> torch.dtype:
        return self.get("norm.weight").dtype

    # ----- HF

    def _open_hf(self) -> tuple[LlamaConfig, dict[str, Any]]:
        raw = _read_json(self.path / "config.json")
        cfg = config_from_hf(raw, self.path / "config.json")
        self.named_ids = named_special_ids(raw)
        self._handles: dict[str, Any] = {}
        index = self.path / HF_INDEX
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
        elif (self.path / HF_SINGLE).is_file():
            weight_map = dict.fromkeys(self._hf_handle(HF_SINGLE).keys(), HF_SINGLE)
        else:
            found = sorted(p.name for p in self.path.iterdir())
            raise CheckpointError(
                f"{self.path}: HF checkpoint without {HF_SINGLE} or {HF_INDEX} (only safetensors are read); found {found[:20]}"
            )
        where: dict[str, tuple[str, str]] = {}
        for hf, file in weight_map.items():
            if hf.endswith("rotary_emb.inv_freq"):
                continue
            if hf == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # a tied model's head is its embedding; some tools store the copy anyway
            name = c2a_name(hf)
            if name is None:
                raise CheckpointError(f"{self.path / file}: unexpected tensor {hf!r} (not part of a Llama-2 model)")
            where[name] = (hf, file)
        for file in sorted({f for _, f in where.values()}):
            if not (self.path / file).is_file():
                raise CheckpointError(f"{self.path}: missing shard {file} (listed in {HF_INDEX})")
        self._hf_nkv = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}
        return cfg, where

    def _hf_handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = _safe_open(self.path / file)
        return self._handles[file]

    def _get_hf(self, name: str) -> torch.Tensor:
        hf, file = self._where[name]
        t = self._hf_handle(file).get_tensor(hf)  # present: _validate checked every listed tensor
        kind = name.split(".", 2)[-1]
        if kind in self._hf_nkv:
            t = from_hf_rotary(t, self._hf_nkv[kind])
        return t

    # ----- Meta

    def _open_meta(self) -> tuple[LlamaConfig, dict[str, Any]]:
        params_path = self.path / "params.json"
        params = _read_json(params_path)
        self.named_ids: frozenset[str] = frozenset()  # params.json has no special-token ids: Llama-2's 1 / 2 stay
        pth = sorted(self.path.glob("consolidated.*.pth"))
        sft = sorted(self.path.glob("consolidated.*.safetensors"))
        if pth and sft:
            raise CheckpointError(
                f"{self.path}: both consolidated.*.pth and consolidated.*.safetensors present; keep one"
            )
        files = pth or sft
        if not files:
            raise CheckpointError(
                f"{self.path}: Meta checkpoint without consolidated.NN.pth or consolidated.NN.safetensors shards"
            )
        suffix = files[0].suffix
        for i in range(len(files)):
            want = self.path / f"consolidated.{i:02d}{suffix}"
            if want not in files:
                raise CheckpointError(f"{self.path}: missing shard {want.name} (found {[f.name for f in files]})")
        self._shards = [_Shard(f) for f in files]
        self._shard_files = files
        keys0 = set(self._shards[0].keys()) - set(_META_IGNORED)
        for f, shard in zip(files[1:], self._shards[1:]):
            keys = set(shard.keys()) - set(_META_IGNORED)
            if keys != keys0:
                diff = sorted(keys ^ keys0)
                raise CheckpointError(f"{f}: holds different tensors from {files[0].name}: {diff[:5]}")
        if params.get("vocab_size", -1) == -1:
            if "tok_embeddings.weight" not in keys0:
                raise CheckpointError(
                    f"{params_path}: vocab_size is -1 and {files[0]} has no tok_embeddings.weight to take it from"
                )
            params = {**params, "vocab_size": self._shards[0].shape("tok_embeddings.weight")[0]}
        cfg = config_from_meta(params, params_path)
        if "output.weight" not in keys0 and "tok_embeddings.weight" in keys0:
            cfg = cfg.replace(tie_word_embeddings=True)  # Meta's tied models (Llama-3.2 1B/3B) store no head
        return cfg, {name: None for name in self._shards[0].keys() if name not in _META_IGNORED}

    def _get_meta(self, name: str) -> torch.Tensor:
        parts = [shard[name] for shard in self._shards]
        if len(parts) == 1:
            return parts[0]
        kind = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if kind in _META_CAT_DIM0:
            return torch.cat(parts, dim=0)
        if kind in _META_CAT_DIM1:
            return torch.cat(parts, dim=1)
        return parts[0]  # norms are replicated on every model-parallel rank

    def _merged_shape(self, name: str) -> tuple[int, ...]:
        shapes = [s.shape(name) for s in self._shards]
        kind = name.split(".", 2)[-1] if name.startswith("layers.") else name
        dim = 0 if kind in _META_CAT_DIM0 else 1 if kind in _META_CAT_DIM1 else None
        for f, shape in zip(self._shard_files[1:], shapes[1:]):
            if [d for i, d in enumerate(shape) if i != dim] != [d for i, d in enumerate(shapes[0]) if i != dim]:
                raise CheckpointError(
                    f"{f}: tensor {name!r} has shape {shape}, incompatible with {shapes[0]} in {self._shard_files[0].name}"
                )
        if dim is None or len(shapes) == 1:
            return shapes[0]
        merged = list(shapes[0])
        merged[dim] = sum(s[dim] for s in shapes)
        return tuple(merged)

    # ----- checks

    def _source_of(self, name: str) -> str:
        if self.format == "hf":
            hf, file = self._where[name]
            return f"{self.path / file}: tensor {hf!r}"
        return f"{self._shard_files[0]}{' (merged over ' + str(len(self._shards)) + ' shards)' if len(self._shards) > 1 else ''}: tensor {name!r}"

    def _validate(self) -> None:
        want = expected_shapes(self.config)
        cfg_file = "config.json" if self.format == "hf" else "params.json"
        missing = [n for n in want if n not in self._where]
        if missing:
            raise CheckpointError(
                f"{self.path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} of {len(want)})"
            )
        for name in self._where:
            if name not in want:
                raise CheckpointError(f"{self._source_of(name)} is unexpected for the model {cfg_file} describes")
            shape = self._stored_shape(name)
            if shape != want[name]:
                raise CheckpointError(
                    f"{self._source_of(name)} has shape {shape}, but {self.path / cfg_file} implies {want[name]}"
                )

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        if self.format == "meta":
            return self._merged_shape(name)
        hf, file = self._where[name]
        f = self._hf_handle(file)
        if hf not in f.keys():
            raise CheckpointError(f"{self.path / file}: tensor {hf!r} listed in {HF_INDEX} is not in the file")
        return tuple(f.get_slice(hf).get_shape())


class _Shard:
    """One Meta shard, read lazily: `.pth` through torch.load's mmap, safetensors through safe_open."""

    def __init__(self, file: Path) -> None:
        self.file = file
        try:
            if file.suffix == ".safetensors":
                self._st = safe_open(file, framework="pt")
                self._keys = list(self._st.keys())
                return
            # weights_only: never unpickle arbitrary objects; mmap: tensors are read when touched
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot be read as a checkpoint shard ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file}: expected a dict of tensors")
        self._st = None
        self._state = state
        self._keys = list(state)

    def keys(self) -> list[str]:
        return self._keys

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._st.get_tensor(name) if self._st is not None else self._state[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._st.get_slice(name).get_shape()) if self._st is not None else tuple(self._state[name].shape)


def _safe_open(file: Path) -> Any:
    """safe_open with the file named when it is not a complete safetensors file (a download cut short, a
    git-lfs pointer, another format): safetensors' own error ("incomplete metadata") names none."""
    try:
        return safe_open(file, framework="pt")
    except Exception as e:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({type(e).__name__}: {e}); re-download or re-convert it"
        ) from None


def _check_types(raw: dict[str, Any], where: Path | str, ints: tuple[str, ...], numbers: tuple[str, ...]) -> None:
    """Config values of the wrong JSON type (e.g. "num_hidden_layers": "4") named, before they reach a
    comparison that fails without naming them."""
    for key in ints + numbers:
        value = raw.get(key)
        want_int = key in ints
        ok = value is None or (not isinstance(value, bool) and isinstance(value, int if want_int else (int, float)))
        if not ok:
            raise CheckpointError(
                f"{where}: {key} must be {'an integer' if want_int else 'a number'}, got {type(value).__name__} {value!r}"
            )


def _readable_as_usual(file: Path) -> None:
    """safetensors' save_file creates its file 0600 (it writes through a private temporary file); give it the
    mode any other file written here gets (0666 less the umask), like config.json beside it."""
    umask = os.umask(0)
    os.umask(umask)
    file.chmod(0o666 & ~umask)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def config_from_hf(raw: dict[str, Any], where: Path | str = "config.json") -> LlamaConfig:
    """An HF LlamaConfig dict (transformers 4.x or 5.x) -> c2a LlamaConfig."""
    if raw.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{where}: model_type {raw.get('model_type')!r} is not 'llama'")
    unsupported = {
        "attention_bias": bool(raw.get("attention_bias")),
        "mlp_bias": bool(raw.get("mlp_bias")),
        "hidden_act": raw.get("hidden_act", "silu") != "silu",
    }
    # transformers 5 writes rope_parameters (theta included); 4.x wrote rope_theta + rope_scaling ("type" before 4.43)
    rope = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{where}: unsupported Llama variant ({', '.join(bad)}); c2a implements Llama-2")
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(
            f"{where}: unsupported rope scaling type {rope_type!r}; c2a implements 'default' and 'llama3'"
        )
    scaled = _llama3_rope_scaling(rope, where) if rope_type == "llama3" else {}
    if not isinstance(raw.get("tie_word_embeddings", False), bool):
        raise CheckpointError(f"{where}: tie_word_embeddings must be true or false, got {raw['tie_word_embeddings']!r}")
    _check_types(
        raw,
        where,
        ints=(
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "intermediate_size",
            "max_position_embeddings",
            "head_dim",
        ),
        numbers=("rms_norm_eps", "rope_theta"),
    )
    special_ids = _special_ids_from_hf(raw, where)
    try:
        heads = raw["num_attention_heads"]
        cfg = LlamaConfig(
            dim=raw["hidden_size"],
            n_layers=raw["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=raw.get("num_key_value_heads") or heads,
            vocab_size=raw["vocab_size"],
            norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            max_seq_len=raw.get("max_position_embeddings", 4096),
            ffn_hidden_dim=raw["intermediate_size"],
            # transformers' default is true, but every config.json of a Llama says which it is
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            **special_ids,
            **scaled,
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from e
    if raw.get("head_dim") not in (None, cfg.head_dim):
        raise CheckpointError(
            f"{where}: head_dim {raw['head_dim']} != hidden_size / num_attention_heads = {cfg.head_dim}"
        )
    return cfg


def _llama3_rope_scaling(rope: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """Llama-3.1's rope scaling of an HF config (rope_scaling / rope_parameters) as LlamaConfig fields."""
    _check_types(
        rope,
        f"{where} rope scaling",
        ints=("original_max_position_embeddings",),
        numbers=("factor", "low_freq_factor", "high_freq_factor"),
    )
    missing = [
        k
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if rope.get(k) is None
    ]
    if missing:
        raise CheckpointError(f"{where}: llama3 rope scaling without {', '.join(missing)}")
    return dict(
        use_scaled_rope=True,
        rope_scaling_factor=rope["factor"],
        low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"],
        original_max_seq_len=rope["original_max_position_embeddings"],
    )


SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id")


def _special_ids_from_hf(raw: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """config.json's bos_token_id (an integer) and eos_token_id (an integer or a list of them), as written;
    null is kept as None. An absent key keeps LlamaConfig's default, Llama-2's 1 / 2, which is also what
    transformers reads for it."""
    ids: dict[str, Any] = {}
    for key in SPECIAL_ID_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        several = key == "eos_token_id" and isinstance(value, list)
        ok = value is None or all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (value if several else [value])
        )
        if not ok:
            want = "a non-negative integer" + (", a list of them" if key == "eos_token_id" else "") + " or null"
            raise CheckpointError(f"{where}: {key} must be {want}, got {type(value).__name__} {value!r}")
        ids[key] = tuple(value) if several else value
    return ids


def named_special_ids(raw: dict[str, Any]) -> frozenset[str]:
    """The special-token keys an HF config.json gives a value (not absent, not null)."""
    return frozenset(k for k in SPECIAL_ID_KEYS if raw.get(k) is not None)


def with_tokenizer_ids(cfg: LlamaConfig, named: frozenset[str], bos_id: int, eos_id: int) -> LlamaConfig:
    """The special-token ids an export writes when a tokenizer is known (the trainer's export).

    The rule: the source checkpoint's config.json is the authority for every id it names, since it can list
    several EOS ids (Llama-3.1-Instruct's end_of_text, eom_id and eot_id), which a tokenizer file cannot
    express, and transformers' generate stops at exactly those. The tokenizer's BOS / EOS fill the ids the
    source does not name: a Meta params.json, a preset, a config.json without the key or with null.
    `named` is `CheckpointReader.named_ids` (empty without a checkpoint)."""
    fill = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    return cfg.replace(**{k: v for k, v in fill.items() if k not in named})


_META_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "max_seq_len",
    "ffn_hidden_dim",
    "use_scaled_rope",
    "rope_scaling_factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_seq_len",
)


def config_from_meta(params: dict[str, Any], where: Path | str = "params.json") -> LlamaConfig:
    """Meta's params.json -> LlamaConfig. Keys c2a does not use are logged and ignored."""
    extra = sorted(set(params) - set(_META_FIELDS))
    if extra:
        log.warning("%s: ignoring keys %s", where, extra)
    _check_types(
        params,
        where,
        ints=(
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "multiple_of",
            "max_seq_len",
            "ffn_hidden_dim",
            "original_max_seq_len",
        ),
        numbers=(
            "ffn_dim_multiplier",
            "norm_eps",
            "rope_theta",
            "rope_scaling_factor",
            "low_freq_factor",
            "high_freq_factor",
        ),
    )
    try:
        return LlamaConfig(**{k: params[k] for k in _META_FIELDS if k in params and params[k] is not None})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from e


# ---------------------------------------------------------------------------------------------- loading


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Llama:
    """A Llama with the weights of an HF or Meta checkpoint directory, in `dtype` (default: as stored)."""
    reader = CheckpointReader(path)
    dtype = dtype or reader.dtype()
    with torch.device("meta"):
        model = Llama(reader.config)
    model = model.to(dtype).to_empty(device=device)
    load_into(model, reader)
    return model


@torch.no_grad()
def load_into(model: Llama, reader: CheckpointReader) -> None:
    """Copies every tensor of `reader` into the model's parameters (converting dtype)."""
    params = dict(model.named_parameters())
    if set(params) != set(reader.names):
        raise CheckpointError(
            f"{reader.path}: tensors {sorted(set(params) ^ set(reader.names))[:8]} do not match the model"
        )
    for name, p in params.items():
        p.copy_(reader.get(name))


# ---------------------------------------------------------------------------------------------- writing


def hf_config(cfg: LlamaConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM (4.x reads rope_theta, 5.x rope_parameters)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta} | _hf_rope_scaling(cfg),
        **({"rope_scaling": _hf_rope_scaling(cfg)} if cfg.use_scaled_rope else {}),  # 4.x reads this one
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        # several EOS ids are a list in config.json, as transformers writes them
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _hf_rope_scaling(cfg: LlamaConfig) -> dict[str, Any]:
    if not cfg.use_scaled_rope:
        return {}
    return {
        "rope_type": "llama3",
        "factor": cfg.rope_scaling_factor,
        "low_freq_factor": cfg.low_freq_factor,
        "high_freq_factor": cfg.high_freq_factor,
        "original_max_position_embeddings": cfg.original_max_seq_len,
    }


# ModelArgs' fields in Meta's Llama-2 code (llama/model.py), less max_seq_len and max_batch_size: its loader
# builds ModelArgs(max_seq_len=..., max_batch_size=..., **params), so params.json may hold only these (a
# max_seq_len in it is "got multiple values for keyword argument", any other name an unexpected keyword).
_META_PARAMS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
)


def meta_params(cfg: LlamaConfig) -> dict[str, Any]:
    """params.json as Meta's Llama-2 loader reads it. max_seq_len is not written (the loader passes its
    own; c2a reads 4096, Llama-2's context, back). Two keys no Llama-2 has are added only where the model
    needs them, and Meta's Llama-2 code cannot load the result (a warning says so; c2a can): rope_theta
    (Code Llama's params.json name) when it is not 10000, and ffn_hidden_dim when Meta's formula does not
    give the FFN width (an HF model with another intermediate_size)."""
    params = {k: getattr(cfg, k) for k in _META_PARAMS}
    multiple_of = _meta_multiple_of(cfg)
    if multiple_of is not None:
        params["multiple_of"] = multiple_of
    else:
        params["ffn_hidden_dim"] = cfg.ffn_hidden_dim
    if cfg.rope_theta != 10000.0:
        params["rope_theta"] = cfg.rope_theta
    if cfg.use_scaled_rope:  # Llama-3.1's names; Meta's code fixes low_freq_factor 1 and original context 8192
        params.update(
            use_scaled_rope=True,
            rope_scaling_factor=cfg.rope_scaling_factor,
            high_freq_factor=cfg.high_freq_factor,
            low_freq_factor=cfg.low_freq_factor,
            original_max_seq_len=cfg.original_max_seq_len,
        )
    extra = sorted(set(params) - set(_META_PARAMS))
    if extra:
        log.warning(
            "params.json: %s are not fields of Meta's Llama-2 ModelArgs; Meta's code will not load this checkpoint",
            extra,
        )
    return {k: v for k, v in params.items() if v is not None}


def _meta_multiple_of(cfg: LlamaConfig) -> int | None:
    """A multiple_of for which Meta's formula gives the model's FFN width, or None if none does.

    An HF config has no multiple_of (c2a reads the default 256 and keeps intermediate_size as the width).
    Meta's width is m * ceil(h / m) with h = int(8 * dim / 3) (times ffn_dim_multiplier): every divisor m of
    the width F with m > F - h gives F. The configured one is kept when it works (Llama-2 7B/13B: 256), else
    the largest power of two that works (like Meta's own: 256, 4096), else the smallest divisor."""
    F = cfg.ffn_hidden_dim
    if meta_ffn_hidden_dim(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier) == F:
        return cfg.multiple_of
    powers = [1 << k for k in range(F.bit_length(), -1, -1)]
    divisors = [m for m in range(1, F + 1) if F % m == 0]
    return next(
        (m for m in powers + divisors if F % m == 0 and meta_ffn_hidden_dim(cfg.dim, m, cfg.ffn_dim_multiplier) == F),
        None,
    )


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output directory exists and is not empty; refusing to overwrite it")
    out.mkdir(parents=True, exist_ok=True)


def save_hf(
    cfg: LlamaConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Writes c2a-named tensors as an HF checkpoint: config.json and safetensors shards (with an index
    when there is more than one). Tensors are consumed one at a time and each shard is written as soon as
    it is full, so at most one shard is held; shards get their final `-of-N` names once N is known."""
    out = Path(out_dir)
    _prepare_out_dir(out)
    shapes = expected_shapes(cfg)
    meta = {"format": "pt"}
    written: list[tuple[Path, list[str]]] = []  # (partial file, its HF tensor names)
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    dtype = None
    seen = set()
    heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}

    def flush() -> None:
        partial = out / f"shard-{len(written):05d}.safetensors.partial"
        save_file(shard, partial, metadata=meta)
        _readable_as_usual(partial)
        written.append((partial, list(shard)))

    for name, t in tensors:
        if name not in shapes or tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"save_hf: tensor {name!r} with shape {tuple(t.shape)} does not belong to {cfg}")
        seen.add(name)
        dtype = dtype or t.dtype
        kind = name.split(".", 2)[-1]
        t = t.detach().to("cpu")
        if kind in heads:
            t = to_hf_rotary(t, heads[kind])
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[hf_name(name)] = t.contiguous()
        size += nbytes
        total += nbytes
    missing = sorted(set(shapes) - seen)
    if missing:
        raise CheckpointError(f"save_hf: missing tensors {missing[:8]}")
    flush()
    if len(written) == 1:
        written[0][0].rename(out / HF_SINGLE)
    else:
        weight_map = {}
        for i, (partial, names) in enumerate(written):
            file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            partial.rename(out / file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
    return out


def save_meta(cfg: LlamaConfig, tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path) -> Path:
    """Writes c2a-named tensors in Meta's layout as params.json + consolidated.00.safetensors."""
    out = Path(out_dir)
    _prepare_out_dir(out)
    state = {name: t.detach().to("cpu").contiguous() for name, t in tensors}
    shapes = expected_shapes(cfg)
    if {n: tuple(t.shape) for n, t in state.items()} != shapes:
        raise CheckpointError(f"save_meta: tensors do not match {cfg}")
    save_file(state, out / "consolidated.00.safetensors", metadata={"format": "pt"})
    (out / "params.json").write_text(json.dumps(meta_params(cfg), indent=2) + "\n")
    return out


def save_pretrained(model: Llama, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Writes an unsharded Llama as an HF directory that transformers' LlamaForCausalLM loads."""
    return save_hf(model.cfg, ((n, p) for n, p in model.named_parameters()), out_dir, max_shard_bytes)
