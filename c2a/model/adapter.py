"""PEFT LoRA adapter directories, the one format c2a reads and writes adapters in: adapter_config.json and
adapter_model.safetensors, as `peft.PeftModel.save_pretrained` writes them for a transformers Llama.

Keys are PEFT's, in HF names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, lora_A
[r, in], lora_B [out, r]). HF's q/k rows are in rotate-half order where c2a keeps Meta's interleaved pairs
(c2a.model.weights); the update B·A of q and k takes the same row permutation as their weights, and it is
all in B's rows: lora_B of q_proj/k_proj is permuted at this boundary, lora_A never is.

PEFT features c2a does not implement are refused by name rather than half-applied: DoRA, modules_to_save,
rank_pattern / alpha_pattern, bias other than "none", and target_modules that are not Llama's seven linears.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from c2a.config import LORA_TARGETS, LlamaConfig
from c2a.model.llama import Llama
from c2a.model.lora import LORA_MODULES, lora_delta, lora_layers
from c2a.model.weights import CheckpointError, from_hf_rotary, to_hf_rotary

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_META_TO_PEFT = {meta: peft for peft, meta in LORA_TARGETS.items()}
_HF_PARENT = {"wq": "self_attn", "wk": "self_attn", "wv": "self_attn", "wo": "self_attn"} | dict.fromkeys(
    ("w1", "w2", "w3"), "mlp"
)
_C2A_RE = re.compile(r"layers\.(\d+)\.(?:attention|feed_forward)\.(w[qkvo123])\.(lora_[AB])")
_PEFT_RE = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(lora_[AB])\.weight")


class AdapterError(CheckpointError):
    """An adapter that cannot be used with this base (or at all by c2a): the message names key and shapes."""


@dataclass(frozen=True)
class AdapterSpec:
    """What fixes an adapter's shape and scale: rank, alpha, dropout, targets (c2a names), rslora."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def peft_key(name: str) -> str:
    """c2a's `layers.3.attention.wq.lora_B` -> PEFT's `base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight`."""
    m = _C2A_RE.fullmatch(name)
    if m is None:
        raise KeyError(f"{name!r} is not a LoRA parameter of a c2a Llama")
    layer, target, which = m.groups()
    return f"base_model.model.model.layers.{layer}.{_HF_PARENT[target]}.{_META_TO_PEFT[target]}.{which}.weight"


def c2a_key(key: str) -> str | None:
    m = _PEFT_RE.fullmatch(key)
    if m is None or m.group(2) not in LORA_TARGETS:
        return None
    layer, target, which = m.group(1), LORA_TARGETS[m.group(2)], m.group(3)
    return f"layers.{layer}.{LORA_MODULES[target]}.{which}"


def _rotary_heads(name: str, cfg: LlamaConfig) -> int | None:
    """The heads whose rows lora_B of wq / wk is permuted by at the HF boundary; None for every other tensor."""
    if name.endswith("wq.lora_B"):
        return cfg.n_heads
    if name.endswith("wk.lora_B"):
        return cfg.n_kv_heads
    return None


def to_peft(name: str, t: torch.Tensor, cfg: LlamaConfig) -> tuple[str, torch.Tensor]:
    heads = _rotary_heads(name, cfg)
    return peft_key(name), (to_hf_rotary(t, heads) if heads else t)


def from_peft(name: str, t: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """A tensor under its c2a name, in c2a's rotary layout."""
    heads = _rotary_heads(name, cfg)
    return from_hf_rotary(t, heads) if heads else t


def adapter_config(spec: AdapterSpec, base_model: str) -> dict[str, Any]:
    """adapter_config.json as PEFT's LoraConfig writes it (the fields c2a sets; PEFT fills in the rest)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(_META_TO_PEFT[t] for t in spec.targets),
        "use_rslora": spec.rslora,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(
    spec: AdapterSpec, cfg: LlamaConfig, tensors: Iterable[tuple[str, torch.Tensor]], out: Path, base_model: str
) -> Path:
    """Writes a PEFT adapter directory from c2a-named LoRA tensors (other names are skipped), fp32."""
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in tensors:
        if _C2A_RE.fullmatch(name):
            key, value = to_peft(name, t.detach().to("cpu", torch.float32), cfg)
            state[key] = value.contiguous()
    expected = 2 * cfg.n_layers * len(spec.targets)
    if len(state) != expected:
        raise AdapterError(f"save_adapter: {len(state)} LoRA tensors, expected {expected} for {spec}")
    save_file(state, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(spec, base_model), indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- reading


def read_adapter_spec(path: str | Path) -> AdapterSpec:
    """The adapter's settings from its adapter_config.json; AdapterError for what c2a cannot apply."""
    path = Path(path)
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{file}: unreadable ({e})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{file}: peft_type {raw.get('peft_type')!r}; c2a reads LoRA adapters only")
    unsupported = {
        "use_dora": raw.get("use_dora") not in (None, False),
        "modules_to_save": bool(raw.get("modules_to_save")),
        "rank_pattern": bool(raw.get("rank_pattern")),
        "alpha_pattern": bool(raw.get("alpha_pattern")),
        "bias": raw.get("bias", "none") != "none",
        "lora_bias": raw.get("lora_bias") not in (None, False),
        "layers_to_transform": raw.get("layers_to_transform") is not None,
    }
    named = [f"{k}={raw.get(k)!r}" for k, bad in unsupported.items() if bad]
    if named:
        raise AdapterError(f"{file}: {', '.join(named)}: not supported by c2a (plain LoRA only)")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = ["all-linear"] if targets == "all-linear" else None
    if not isinstance(targets, list) or not targets:
        raise AdapterError(f"{file}: target_modules {raw.get('target_modules')!r}: c2a needs a list of module names")
    unknown = sorted(set(targets) - set(LORA_TARGETS) - {"all-linear"})
    if unknown:
        raise AdapterError(f"{file}: target_modules {unknown} are not Llama linears ({', '.join(LORA_TARGETS)})")
    meta = LORA_MODULES.keys() if "all-linear" in targets else {LORA_TARGETS[t] for t in targets}
    return AdapterSpec(
        int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout", 0.0)), tuple(sorted(meta)),
        bool(raw.get("use_rslora", False)),
    )  # fmt: skip


def read_adapter(path: str | Path, cfg: LlamaConfig) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """The adapter's settings and its tensors under c2a's names and layout (fp32), checked against the base
    `cfg`: every key present with the shape the base gives it, nothing else."""
    path = Path(path)
    spec = read_adapter_spec(path)
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS}")
    expected = expected_adapter_shapes(cfg, spec)
    tensors = {}
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            name = c2a_key(key.replace(".default.weight", ".weight"))
            if name is None or name not in expected:
                raise AdapterError(f"{file}: key {key} does not belong to a rank-{spec.rank} adapter of {spec.targets}")
            t = f.get_tensor(key)
            hf_shape = tuple(t.shape)
            if hf_shape != expected[name]:
                raise AdapterError(
                    f"{file}: {key} has shape {hf_shape}, but the base model (dim {cfg.dim}, ffn {cfg.ffn_hidden_dim}) "
                    f"needs {expected[name]}: an adapter for another model"
                )
            tensors[name] = from_peft(name, t.float(), cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(f"{file}: missing {', '.join(peft_key(n) for n in missing[:4])}")
    return spec, tensors


def expected_adapter_shapes(cfg: LlamaConfig, spec: AdapterSpec) -> dict[str, tuple[int, int]]:
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Llama(cfg).named_parameters()}
    out = {}
    for i in range(cfg.n_layers):
        for target in spec.targets:
            o, inp = shapes[f"layers.{i}.{LORA_MODULES[target]}.weight"]
            out[f"layers.{i}.{LORA_MODULES[target]}.lora_A"] = (spec.rank, inp)
            out[f"layers.{i}.{LORA_MODULES[target]}.lora_B"] = (o, spec.rank)
    return out


def merged_tensors(
    base: Iterable[tuple[str, torch.Tensor]], spec: AdapterSpec, tensors: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors with W + s·B·A for every adapted one (fp32 sum, stored in W's dtype)."""
    for name, w in base:
        stem = name.removesuffix(".weight")
        if f"{stem}.lora_A" in tensors:
            delta = lora_delta(tensors[f"{stem}.lora_A"], tensors[f"{stem}.lora_B"], spec.scale)
            w = (w.float() + delta).to(w.dtype)
        yield name, w


@torch.no_grad()
def merge_adapter(model: Llama, path: str | Path) -> Llama:
    """In place: the PEFT adapter at `path` merged into a loaded (plain) Llama's weights."""
    spec, tensors = read_adapter(path, model.cfg)
    return merge_adapter_tensors(model, spec, tensors)


@torch.no_grad()
def merge_adapter_tensors(model: Llama, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> Llama:
    """In place: W + s·B·A for every adapted weight of a plain Llama (`read_adapter`'s tensors)."""
    if lora_layers(model):
        raise AdapterError("merge_adapter: the model already holds LoRA layers")
    params = dict(model.named_parameters())
    for name, w in merged_tensors(((n, params[n]) for n in list(params)), spec, tensors):
        params[name].copy_(w)
    return model
