"""A training config as the planner sees it: the model, the data's lengths, the machine, and what one rank
runs per micro-batch (`Workload`, which `c2a.plan.memory` turns into bytes).

Data lengths come from a prepared cache (data.path a directory, or out_dir/data_cache of a started run), a
local data file (tokenized here with the run's tokenizer, as the trainer tokenizes it) or the demo task;
otherwise from given or assumed numbers, stated as assumptions.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from c2a.config import LlamaConfig, TrainConfig
from c2a.data import TokenizedDataset, Tokenizer
from c2a.data.sources import demo_dataset, resolve_tokenizer, tokenize_records_file
from c2a.model.adapter import read_adapter_spec
from c2a.model.weights import config_from_hf, config_from_meta
from c2a.plan.memory import Workload

GiB = 2**30
# Dense bf16 peaks (FLOP/s, no sparsity) and memory of the cards the planner knows: vendors' datasheets
# (H100 SXM 989 TFLOP/s 80 GB, H200 989 TFLOP/s 141 GB, A100 SXM 312 TFLOP/s 80 GB, GeForce RTX 4090 165 TFLOP/s
# 24 GB: one GPU for LoRA).
GPUS = {"h100": (989e12, 80.0), "h200": (989e12, 141.0), "a100": (312e12, 80.0), "rtx4090": (165e12, 24.0)}
# What a GPU holds besides the tensors the planner counts: CUDA context and kernels (~0.5-1 GB), NCCL's
# buffers, the caching allocator's fragmentation. An assumption, not a measurement.
RESERVED_GIB = 4.0
# c2a's MFU measured on one H200 (benchmarks/RESULTS.md, GPU training table): 39.5-40.5% for a
# Llama-2-7B block stack of 8 layers, rows of 2048, bf16, FSDP2 in a group of one, no activation
# checkpointing. Multi-GPU runs and the full 32/40-layer models are not measured: --mfu for another value.
DEFAULT_MFU = 0.40
# Without a cache to read lengths from: Alpaca's 52,002 examples, and the mean tokens of an example (prompt
# + response) and the share trained (response + EOS) for Claude-2-length answers. Assumptions, printed as such.
DEFAULT_EXAMPLES, DEFAULT_MEAN_TOKENS, DEFAULT_TRAINED_FRACTION = 52002, 400, 0.6


@dataclass(frozen=True)
class DataShape:
    examples: int
    tokens: int  # every example's positions, summed
    trained_tokens: int
    max_tokens: int  # the longest example (padded micro-batches are padded to their longest)
    source: str  # where the numbers come from ("assumed ..." when not measured)


@dataclass(frozen=True)
class Machine:
    gpus: int
    nodes: int
    name: str
    memory_gib: float
    peak_flops: float
    mfu: float
    mfu_source: str


def resolve_model(cfg: TrainConfig) -> tuple[LlamaConfig, str]:
    """The model from the checkpoint's config.json / params.json, or the preset; a checkpoint path that does not
    exist but names a Llama-2 size (the recipes' SET-ME/Llama-2-13b-hf) gives that preset, said so. With
    model.add_pad_token, one more vocabulary row, as the trainer builds it."""
    model, source = _checkpoint_model(cfg)
    if cfg.model.add_pad_token:
        return model.replace(vocab_size=model.vocab_size + 1), source + " + a pad token"
    return model, source


def _checkpoint_model(cfg: TrainConfig) -> tuple[LlamaConfig, str]:
    path = Path(cfg.model.checkpoint) if cfg.model.checkpoint else None
    if path is None:
        return LlamaConfig.from_name(cfg.model.preset), f"preset {cfg.model.preset}"
    if (path / "config.json").is_file():
        return config_from_hf(json.loads((path / "config.json").read_text()), path / "config.json"), str(
            path / "config.json"
        )
    if (path / "params.json").is_file():
        return config_from_meta(json.loads((path / "params.json").read_text()), path / "params.json"), str(
            path / "params.json"
        )
    size = re.search(r"(?i)llama-?2-(7|13|70)b", str(path))
    if size:
        name = f"llama2-{size.group(1)}b"
        return LlamaConfig.from_name(
            name
        ), f"preset {name} (assumed from the name {path}, which is not a checkpoint here)"
    raise ValueError(
        f"model.checkpoint {path}: no config.json or params.json there; point it at an HF or Meta checkpoint directory, or leave it empty and set model.preset"
    )


def resolve_data(
    cfg: TrainConfig, examples: int | None, mean_tokens: float | None, trained_fraction: float | None
) -> DataShape:
    if examples is not None or mean_tokens is not None or trained_fraction is not None:
        return _assumed(examples, mean_tokens, trained_fraction, "given")
    if cfg.data.mix:
        return _mix_shape(cfg)
    for cache in (Path(cfg.data.path), Path(cfg.out_dir) / "data_cache"):
        manifest = cache / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            c = m["counts"]
            return DataShape(
                c["examples"], c["tokens"], c["trained_tokens"], int(m["lengths"]["max"]), f"measured: {manifest}"
            )
    if cfg.data.is_demo:
        return _measured(demo_dataset(cfg, Tokenizer(resolve_tokenizer(cfg)))[0], "measured: the demo task")
    if Path(cfg.data.path).is_file():  # a local data file: tokenized here as the trainer would (not cached)
        ds = tokenize_records_file(cfg, Tokenizer(resolve_tokenizer(cfg)), workers=cfg.data.workers or 1)
        return _measured(ds, f"measured: {cfg.data.path}")
    return _assumed(
        None,
        None,
        None,
        "assumed (no local data file or prepared cache: run python -m c2a.data.prepare, or pass "
        "--examples/--mean-tokens)",
    )


def _mix_shape(cfg: TrainConfig) -> DataShape:
    """[[data.mix]]: each source measured (its cache, the run's out_dir/mix_cache/K, or its local file
    tokenized here) and counted as many times per epoch as its weight says; assumed when one cannot be."""
    shapes = []
    for k, m in enumerate(cfg.data.mix):
        caches = [Path(m.path) / "manifest.json", Path(cfg.out_dir) / "mix_cache" / str(k) / "manifest.json"]
        manifest = next((c for c in caches if c.is_file()), None)
        if manifest is not None:
            man = json.loads(manifest.read_text())
        elif Path(m.path).is_file():
            tok = Tokenizer(resolve_tokenizer(cfg))
            man = tokenize_records_file(cfg, tok, cfg.data.workers or 1, m.path, m.template).manifest
        else:
            return _assumed(
                None, None, None, f"assumed ([[data.mix]] source {m.path} is neither a local file nor a prepared cache)"
            )
        c = man["counts"]
        shapes.append((m.weight, c["examples"], c["tokens"], c["trained_tokens"], int(man["lengths"]["max"])))
    return DataShape(
        sum(round(w * n) for w, n, _, _, _ in shapes),
        sum(round(w * t) for w, _, t, _, _ in shapes),
        sum(round(w * t) for w, _, _, t, _ in shapes),
        max(x for *_, x in shapes),
        "measured: [[data.mix]] " + ", ".join(f"{m.path} x {m.weight:g}" for m in cfg.data.mix),
    )


def _measured(ds: TokenizedDataset, source: str) -> DataShape:
    c = ds.manifest["counts"]
    return DataShape(c["examples"], c["tokens"], c["trained_tokens"], int(ds.manifest["lengths"]["max"]), source)


def _assumed(examples: int | None, mean_tokens: float | None, trained_fraction: float | None, how: str) -> DataShape:
    n = examples or DEFAULT_EXAMPLES
    mean = mean_tokens or DEFAULT_MEAN_TOKENS
    frac = trained_fraction or DEFAULT_TRAINED_FRACTION
    return DataShape(
        n, round(n * mean), round(n * mean * frac), 0, f"{how}: {n:,} examples of {mean:g} tokens, {frac:.0%} trained"
    )


def workload(cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine, **changes: Any) -> Workload:
    t = cfg.train
    seq_len = cfg.data.max_len if cfg.data.packing or not data.max_tokens else min(cfg.data.max_len, data.max_tokens)
    # packed rows are nearly full (0.27% padding on Alpaca-like lengths, c2a/data/batching.py); padded rows
    # are counted at their worst, a micro-batch holding the longest example
    positions = 1.0 if cfg.data.packing else data.tokens / data.examples / seq_len
    ranks = machine.gpus
    base = dict(
        micro_batch=t.micro_batch,
        seq_len=seq_len,
        trained_fraction=min(1.0, data.trained_tokens / data.tokens * positions),
        packed=cfg.data.packing,
        ranks=ranks,
        replicas=t.replicas,
        compute_bytes=4 if t.dtype == "fp32" and t.master_dtype == "fp32" else 2,
        backend="triton",
        activation_checkpointing=t.activation_checkpointing,
        ac_every=t.ac_every,
        ac_blocks=t.ac_blocks,
        accumulation=accumulation(cfg, data, ranks, t.micro_batch),
        cpu_offload=t.cpu_offload,
        master_bytes=4 if t.master_dtype == "fp32" else 2,
        reduce_bytes=4 if t.reduce_dtype == "fp32" else 2,
        optimizer=t.optimizer,
        gather_once=t.gather_once,
        reduce_once=t.reduce_once,
        fp8=t.fp8,
        **lora_fields(cfg),
    )
    base.update(changes)
    if "micro_batch" in changes and "accumulation" not in changes:
        base["accumulation"] = accumulation(cfg, data, ranks, changes["micro_batch"])
    return Workload(model, **base)


def lora_fields(cfg: TrainConfig) -> dict[str, Any]:
    """[lora] as the Workload counts it (the rank and targets of lora.init_adapter's config where it has one)."""
    lo = cfg.lora
    if not lo.enabled:
        return {}
    nf4 = lo.quantize == "nf4"
    if lo.init_adapter:
        spec = read_adapter_spec(lo.init_adapter)
        return dict(lora_rank=spec.rank, lora_targets=spec.targets, lora_dropout=lo.dropout > 0, lora_nf4=nf4)
    return dict(lora_rank=lo.rank, lora_targets=lo.target_modules(), lora_dropout=lo.dropout > 0, lora_nf4=nf4)


def accumulation(cfg: TrainConfig, data: DataShape, ranks: int, micro_batch: int) -> int:
    """Micro-batches per optimizer step on a rank, as c2a.train.loop.make_loader sizes a step."""
    rows = cfg.train.global_batch
    if cfg.data.packing:
        per_row = cfg.data.max_len / (data.tokens / data.examples)  # examples a packed row holds
        unit = micro_batch * ranks
        rows = max(1, round(cfg.train.global_batch / per_row / unit)) * unit
    return max(1, math.ceil(rows / (micro_batch * ranks)))
