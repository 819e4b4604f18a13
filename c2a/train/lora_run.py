"""A LoRA run's own parts: its adapter settings (from [lora], or the adapter lora.init_adapter continues), the
digest of the base it trains on (checked on resume), and its export: final/ merged, final/adapter/ in PEFT's
format. With lora.quantize = nf4 (QLoRA) the base is re-quantized from model.checkpoint on resume, and the
export merges into the dequantized base (what the adapters trained against), never into the original weights.

A LoRA checkpoint holds only what trains (the adapters), the optimizer, schedule and data position; resume
re-reads the frozen base from model.checkpoint (or re-draws the seeded init), so the base must be the one the
run started with: `base_digest` records its config and the sizes of its weight files, and `check_base`
refuses a resume on a base that differs, naming what changed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from c2a.config import LlamaConfig, LoraSection, TrainConfig
from c2a.model.adapter import AdapterSpec, read_adapter, read_adapter_spec
from c2a.model.lora import lora_delta
from c2a.model.quantized import NF4Linear
from c2a.train.errors import TrainingError

_WEIGHT_FILES = ("*.safetensors", "*.pth", "*.bin")


def lora_spec(lora: LoraSection) -> AdapterSpec | None:
    """The run's adapter settings; None for full fine-tuning. With lora.init_adapter the adapter's own r,
    alpha, targets and rslora win, and a [lora] value set to something else is refused with both values.
    Reads only adapter_config.json: called before any model is loaded."""
    if not lora.enabled:
        return None
    if not lora.init_adapter:
        return AdapterSpec(lora.rank, lora.lora_alpha, lora.dropout, lora.target_modules(), lora.rslora)
    saved = read_adapter_spec(lora.init_adapter)
    ours = {
        "lora.rank": (lora.rank, saved.rank, lora.rank != 0),
        "lora.alpha": (lora.alpha, saved.alpha, lora.alpha != 0),
        "lora.targets": (lora.target_modules(), saved.targets, lora.targets != LoraSection.targets),
        "lora.rslora": (lora.rslora, saved.rslora, lora.rslora),
    }
    clash = [
        f"{k} = {mine} but the adapter has {theirs}"
        for k, (mine, theirs, set_) in ours.items()
        if set_ and mine != theirs
    ]
    if clash:
        raise TrainingError(
            f"lora.init_adapter {lora.init_adapter}: {'; '.join(clash)} (the adapter's settings win: leave these unset)"
        )
    return AdapterSpec(saved.rank, saved.alpha, lora.dropout, saved.targets, saved.rslora)


def initial_adapter(lora: LoraSection, cfg: LlamaConfig) -> dict[str, torch.Tensor] | None:
    """lora.init_adapter's tensors under c2a's names and layout, checked against the base; None without one."""
    return read_adapter(lora.init_adapter, cfg)[1] if lora.init_adapter else None


def base_digest(cfg: TrainConfig, model_cfg: LlamaConfig) -> dict[str, Any]:
    """What identifies the frozen base without reading its tensors: its config and each weight file's size (a
    checkpoint), or the preset and seed of its init (no checkpoint). JSON-ready, as trainer_state.json holds it."""
    digest: dict[str, Any] = {"config": json.loads(json.dumps(model_cfg.to_dict()))}
    if cfg.model.checkpoint:
        root = Path(cfg.model.checkpoint)
        files = sorted({f for pattern in _WEIGHT_FILES for f in root.glob(pattern)})
        digest["files"] = {f.name: f.stat().st_size for f in files}
    else:
        digest["init"] = {"preset": cfg.model.preset, "seed": cfg.train.seed}
    if cfg.lora.quantize != "none":  # absent for an unquantized base, as in checkpoints written before QLoRA
        digest["quantization"] = {"format": cfg.lora.quantize}
    return digest


def check_base(resume: Path, saved: dict[str, Any], digest: dict[str, Any] | None, spec: AdapterSpec | None) -> None:
    """Refuses to resume a LoRA run on another base than the one it started with, or with other adapters (or a
    full fine-tune's checkpoint as LoRA, and back), naming what changed."""
    before, saved_spec = saved.get("base"), saved.get("lora")
    if (before is None) != (digest is None):
        kind = "a LoRA run" if before is not None else "a full fine-tune"
        raise TrainingError(f"{resume} is {kind}'s checkpoint; resume it with the [lora] settings it started with")
    if spec is not None and saved_spec != dataclasses.asdict(spec) | {"targets": list(spec.targets)}:
        raise TrainingError(f"{resume} trained adapters {saved_spec}; the [lora] settings now give {spec}")
    if before is None or before == digest:
        return
    changed = []
    for key in sorted(set(before) | set(digest)):
        old, new = before.get(key, {}), digest.get(key, {})
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                changed.append(f"{key}.{k} {old.get(k)} -> {new.get(k)}")
    what = "lora.quantize" if before.get("quantization") != digest.get("quantization") else "model.checkpoint"
    raise TrainingError(
        f"{resume} trained adapters on another base model ({'; '.join(changed[:6])}); resume with the "
        f"{what} the run started with, or start a new out_dir"
    )


def merged_stream(
    tensors: Iterable[tuple[str, torch.Tensor | None]], stems: set[str], scale: float, dtype: torch.dtype,
    adapter: dict[str, torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor | None]]:  # fmt: skip
    """The model's gathered parameters as a plain Llama's, in `dtype`: each adapted weight W (of the modules
    `stems`) as W + s·B·A (fp32 sum); A and B are kept in `adapter` (fp32), not yielded. A LoRALinear's
    parameters come as weight, lora_A, lora_B, so one weight is held at a time. None (ranks other than 0)
    passes through."""
    held: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        stem, _, leaf = name.rpartition(".")
        if t is None:
            if leaf not in ("lora_A", "lora_B"):
                yield name, None
        elif stem not in stems:
            yield name, t.to(dtype)
        elif leaf == "weight":
            held[stem] = t
        else:
            adapter[name] = t.float()
            if leaf == "lora_B":
                yield (
                    f"{stem}.weight",
                    (held.pop(stem).float() + lora_delta(adapter[f"{stem}.lora_A"], t, scale)).to(dtype),
                )


def dequantized_stream(
    tensors: Iterable[tuple[str, torch.Tensor | None]], bases: dict[str, NF4Linear], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """QLoRA: the gathered parameters with each NF4 base's codes and absmaxes (`stem.base.codes`,
    `stem.base.qabsmax`) replaced by the weight they hold, `stem.weight`, dequantized to `dtype` (the compute
    dtype: the weight the adapters trained against), and the stem's lora_A, lora_B (a module's own parameters
    come before its submodule's) held back until after it, the order `merged_stream` reads. None (ranks other
    than 0) passes through."""
    held: dict[str, list[tuple[str, torch.Tensor | None]]] = {}
    for name, t in tensors:
        stem, _, leaf = name.rpartition(".")
        if stem.endswith(".base") and f"{stem.removesuffix('.base')}.weight" in bases:
            stem = stem.removesuffix(".base")
        weight = f"{stem}.weight"
        if weight not in bases:
            yield name, t
        elif leaf in ("lora_A", "lora_B", "codes"):
            held.setdefault(stem, []).append((name, t))
        else:  # qabsmax, the base's last parameter
            (_, codes), *adapters = sorted(held.pop(stem), key=lambda kv: not kv[0].endswith(".codes"))
            if t is None or codes is None:
                yield weight, None
            else:
                base = bases[weight]
                device = base.absmax2.device
                yield weight, base.dequantize(codes.to(device), t.to(device), dtype).cpu()
            yield from adapters
