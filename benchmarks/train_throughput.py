"""End-to-end training throughput: c2a against the stack the original recipe used and a peer stack, side by side.

    python benchmarks/train_throughput.py [--out DIR] [--steps N] [--smoke] [--sides c2a,c2a-new,c2a-fp8,baseline,peer]

  c2a       c2a's default path for the machine: packed rows (`c2a.train.run_data.make_loader`, which packs with
            MicroBatchLoader(mode="packed") and turns the global batch in examples into rows), the c2a Llama
            built sharded by FSDP2 in a process group of one (`build_sharded_model` + `materialize`), the
            kernel switch's default (Triton on CUDA, torch elsewhere), AdamW (`build_optimizer`), and one
            `train_step` per optimizer step.
  c2a-new   the same with train.gather_once, reduce_once, micro_batch_auto and activation_checkpointing = auto
            (resolved for the device as the trainer does: on CPU the configured micro-batch and no checkpointing)
  c2a-fp8   c2a-new with train.fp8
  peer      transformers with Liger-Kernel's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy, packed rows
            without padding, torch.compile (see `run_peer`); skipped, said so, without liger_kernel
  baseline  Stanford Alpaca's stack: HF transformers' LlamaForCausalLM with the same dimensions (its default
            attention, SDPA), each micro-batch padded to its longest example with labels -100 on prompt and
            padding and an attention mask (Alpaca's DataCollatorForSupervisedDataset), examples in random
            order (HF Trainer's sampler), loss from full logits, gradient accumulation, clipping at 1.0,
            torch AdamW (fused on CUDA, as HF Trainer's default for torch >= 2.8); bf16 autocast on CUDA as HF
            Trainer's --bf16 does.

All sides train on the same synthetic Alpaca-like examples: prompt lengths log-uniform in 20..150 tokens
(template included), responses log-uniform in 10..600 (EOS included), token ids uniform over the real
32000-piece vocabulary; loss on the response and EOS only. All take `--global-batch` examples per optimizer
step: the baseline as micro-batches of `--micro-batch` examples; c2a and the peer as packed rows of `--seq-len` tokens,
as many whole rows as hold that many examples on average (the trainer's rule), `--rows-per-micro` per
forward. Each side runs in its own fresh process, so the peak memories are separate: RSS on CPU, max
allocated on CUDA. The first `--warmup` steps are not timed.

Reported per side: trained tokens/s (targets that are not -100), all tokens/s (non-padding positions),
padding fraction, seconds per optimizer step, examples per step, peak memory, MFU on CUDA (6 FLOPs per
parameter per real token for every matmul, head included, plus causal attention per document, over the
card's dense bf16 peak); with --report each side's step report; and the ratios c2a / baseline, c2a-new /
c2a, c2a-fp8 / c2a-new, c2a-new / peer, c2a-new / baseline. Prints a table; writes DIR/train_throughput.json
and DIR/train_throughput.png. Never asserts a time. On CUDA each side's process is held to SIDE_BUDGET_S
(--no-budgets to lift it); a side that fails or runs out of time is reported, the others still run, and the
exit status is 1.

On a shared 2-core CPU the numbers depend on the load and the thread count: `--threads N` sets torch's
intra-op threads on both sides (default: torch's, 2 here); `--repeats R` runs each side R times, alternating,
and keeps each side's fastest run; "best step" is a side's fastest timed step, the rate least disturbed by
other processes. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow the `kernels`
# package that transformers imports when it is installed (ImportError: cannot import name 'CUDAProperties'
# from 'kernels'): the checkout's root instead, so `c2a` and `benchmarks.*` import without installing.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

CUDA = torch.cuda.is_available()
IGNORE = -100
BOS, EOS, PAD = 1, 2, 0  # Llama-2's ids; PAD (<unk>) never occurs among the synthetic ids, which start at 3


@dataclass(frozen=True)
class Setup:
    """Everything both sides share."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int  # longest example, and c2a's packed row length
    global_batch: int  # examples per optimizer step
    micro_batch: int  # baseline: examples per forward
    rows_per_micro: int  # c2a: packed rows per forward
    steps: int  # timed optimizer steps
    warmup: int  # untimed optimizer steps first
    prompt_range: tuple[int, int]
    response_range: tuple[int, int]
    lr: float
    seed: int
    device: str
    dtype: str  # "bf16" or "fp32": c2a's compute dtype and the baseline's autocast dtype
    threads: int = 0  # torch intra-op threads in each side's process (0: torch's default)
    profile: bool = False  # c2a side: one more step under torch.profiler, its device time by kernel family
    report: bool = False  # c2a side: one more step under c2a.train.step_report (aten ops and bytes by family)
    c2a_set: tuple[str, ...] = ()  # c2a side: train settings KEY=VALUE (e.g. gather_once=true)

    @property
    def n_examples(self) -> int:
        # enough examples that neither side runs out (c2a rows are formed over the whole set)
        return max(512, 3 * self.global_batch * (self.steps + self.warmup))


# The c2a sides: train settings on top of the defaults (and of --c2a-set). "c2a" is the default path; "c2a-new"
# the step's cuts and the planner's choices (issue 24): parameters gathered and cast once per step, gradients
# reduced once per step, the largest micro-batch that fits, as little activation checkpointing as fits;
# "c2a-fp8" the same with the block linears in float8.
NEW = ("gather_once=true", "reduce_once=true", "micro_batch_auto=true", "activation_checkpointing=auto")
C2A_SIDES: dict[str, tuple[str, ...]] = {"c2a": (), "c2a-new": NEW, "c2a-fp8": (*NEW, "fp8=true")}
SIDES = (*C2A_SIDES, "baseline", "peer")
PEER_MISSING = "liger-kernel wheel not found"
# Seconds each side's process may take on a GPU, start to end (model built, warm-up with Triton's and
# torch.compile's compilation, timed steps, the step report, the profiled step): together 145 s, inside
# gpu_check's 150 s train stage. A side past its budget is reported as timed out and the others still run.
SIDE_BUDGET_S = {"c2a": 30, "c2a-new": 25, "c2a-fp8": 20, "baseline": 30, "peer": 40}


def default_setup(smoke: bool, device: str) -> dict[str, Any]:
    if smoke:
        # a CI check that both paths run, not a measurement: tiny model and vocabulary (with 32000 pieces at
        # dim 64, torch's loss chunks to 1 token per chunk and one step takes ~30 s on a busy 2-core CPU),
        # one thread (two threads spin against each other's ops on a shared machine)
        return dict(
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=4,
            vocab_size=1024,
            seq_len=256,
            global_batch=8,
            micro_batch=4,
            rows_per_micro=1,
            steps=2,
            warmup=1,
            prompt_range=(5, 40),
            response_range=(3, 150),
            lr=1e-4,
            seed=0,
            device=device,
            dtype="fp32",
            threads=1,
        )
    if device.startswith("cuda"):
        # Llama-2-7B's block (dim 4096, 32 heads, FFN 11008) and vocabulary, 8 of its 32 layers so that the
        # baseline's fp32 weights + AdamW state (16 bytes/parameter, 1.9B parameters = 30 GB) and its
        # activations fit one 80 GB card; rows of 2048 as the recipe's max length.
        return dict(
            dim=4096,
            n_layers=8,
            n_heads=32,
            n_kv_heads=32,
            vocab_size=32000,
            seq_len=2048,
            global_batch=64,
            micro_batch=4,
            rows_per_micro=2,
            steps=4,
            warmup=2,
            prompt_range=(20, 150),
            response_range=(10, 600),
            lr=1e-5,
            seed=0,
            device=device,
            dtype="bf16",
        )
    # CPU: dim 256, 4 layers, 4 heads of 64, vocab 32000: 19.6M parameters, 16.4M of them embedding + head
    return dict(
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        vocab_size=32000,
        seq_len=2048,
        global_batch=32,
        micro_batch=16,
        rows_per_micro=1,
        steps=4,
        warmup=1,
        prompt_range=(20, 150),
        response_range=(10, 600),
        lr=1e-4,
        seed=0,
        device=device,
        dtype="fp32",
    )


# ------------------------------------------------------------------------------------------------ data


class SyntheticAlpaca:
    """Alpaca-like examples as c2a's loaders read them: `lengths` (input positions) and ds[i] ->
    (input_ids, labels) with input_ids = tokens[:-1], labels = tokens[1:] and the prompt's targets -100;
    `tokens(i)` and `prompt_len[i]` give the baseline its own (Alpaca-style) encoding of the same example."""

    def __init__(self, s: Setup) -> None:
        rng = np.random.default_rng(s.seed)
        n = s.n_examples

        def log_uniform(lo: int, hi: int) -> np.ndarray:
            return np.exp(rng.uniform(math.log(lo), math.log(hi), n)).round().astype(np.int64)

        self.prompt_len = log_uniform(*s.prompt_range)  # BOS included
        self.response_len = log_uniform(*s.response_range)  # EOS included
        total = np.minimum(self.prompt_len + self.response_len, s.seq_len + 1)  # c2a's max_len bounds tokens - 1
        self.response_len = total - self.prompt_len
        self.offsets = np.concatenate([[0], np.cumsum(total)])
        self.flat = rng.integers(3, s.vocab_size, int(self.offsets[-1]), dtype=np.int64)
        self.flat[self.offsets[:-1]] = BOS
        self.flat[self.offsets[1:] - 1] = EOS
        self.lengths = total - 1

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.tokens(i)
        labels = t[1:].copy()
        labels[: self.prompt_len[i] - 1] = IGNORE
        return t[:-1], labels


# ------------------------------------------------------------------------------------------- the sides


@dataclass
class StepStats:
    seconds: float
    examples: int
    trained_tokens: int  # targets != -100
    tokens: int  # non-padding positions
    positions: int  # positions computed, padding included
    attn_sq: int  # sum over documents of length^2 (causal attention FLOPs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setting(text: str) -> tuple[str, Any]:
    """KEY=VALUE as a train setting: true/false a bool, digits an int, anything else a string."""
    key, value = text.split("=", 1)
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, int(value) if value.isdigit() else value


def run_c2a(
    s: Setup, data: SyntheticAlpaca, lora: Any = None, quantize: str = "none", settings: tuple[str, ...] = ()
) -> tuple[list[StepStats], dict[str, Any]]:
    """`lora`: an AdapterSpec for a LoRA run (benchmarks/lora_throughput.py), None for full fine-tuning;
    `quantize` = "nf4" holds its base in NF4 (QLoRA). `settings`: the side's train settings (C2A_SIDES),
    after the Setup's own c2a_set."""
    from c2a.config import DataSection, LlamaConfig, TrainConfig, TrainSection
    from c2a.train.auto_settings import resolve_run_settings
    from c2a.train.optim import build_optimizer
    from c2a.train.parallel import build_sharded_model, init_distributed, materialize
    from c2a.train.run_data import make_loader, step_rows
    from c2a.train.step import StepWork, train_step

    d = init_distributed()
    cfg = TrainConfig(
        out_dir=tempfile.mkdtemp(prefix="c2a-bench-"),
        data=DataSection(max_len=s.seq_len, packing=True),
        train=TrainSection(
            global_batch=s.global_batch,
            micro_batch=s.rows_per_micro,
            lr=s.lr,
            dtype=s.dtype,
            seed=s.seed,
            progress=False,
            **dict(map(setting, (*s.c2a_set, *settings))),
        ),
    )
    model_cfg = LlamaConfig(
        dim=s.dim,
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        n_kv_heads=s.n_kv_heads,
        vocab_size=s.vocab_size,
        max_seq_len=max(4096, s.seq_len),
    )
    # train.micro_batch_auto / activation_checkpointing = auto: chosen for this device, as the trainer does
    rows = step_rows(cfg, data, d.world_size)[0]
    cfg = resolve_run_settings(cfg, model_cfg, d, data, rows, None)
    loader, desc = make_loader(cfg, data, d, rows=rows)
    model = build_sharded_model(model_cfg, cfg.train, d, lora, quantize)
    materialize(model, None, s.seed)
    optimizer = build_optimizer(model, cfg, d.device)
    model.train()
    batches = iter(loader)
    stats = []
    for _ in range(s.warmup + s.steps):
        sync(d.device)
        start = time.perf_counter()
        micro = [next(batches) for _ in range(loader.accum_steps)]
        result = train_step(model, optimizer, micro, cfg.train.grad_clip, d.device, work=StepWork.of(cfg.train))
        loss = result.loss.item()  # the step's end: the host waits for the device here
        sync(d.device)
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise RuntimeError(f"c2a: non-finite loss {loss}")
        stats.append(
            StepStats(
                seconds,
                sum(b.num_examples for b in micro),
                int(result.targets),
                result.tokens,
                result.positions,
                result.attn_sq,
            )
        )
    t = cfg.train
    info = {
        "batching": desc,
        "settings": {
            "micro_batch": t.micro_batch,
            "activation_checkpointing": t.activation_checkpointing,
            "ac_blocks": t.ac_blocks,
            **{k: getattr(t, k) for k in ("gather_once", "reduce_once", "fp8", "dtype")},
        },
        "parameters": model_cfg.num_params,
        "final_loss": loss,
        "kernels": os.environ.get("C2A_KERNELS") or ("triton" if d.device.type == "cuda" else "torch"),
    }
    if s.report:
        from c2a.train.step_report import report_step

        report, _ = report_step(
            lambda: train_step(
                model,
                optimizer,
                [next(batches) for _ in range(loader.accum_steps)],
                cfg.train.grad_clip,
                d.device,
                work=StepWork.of(cfg.train),
            ),
            optimizer,
            model_cfg.num_params,
            d.world_size,
        )
        info["step_report"] = report.as_dict()
        info["step_report_table"] = report.table()
    if s.profile:
        info["profile"] = profile_step(
            lambda: train_step(
                model,
                optimizer,
                [next(batches) for _ in range(loader.accum_steps)],
                cfg.train.grad_clip,
                d.device,
                work=StepWork.of(cfg.train),
            ).loss.item(),
            d.device,
        )
    return stats, info


# Kernel families by name, first match wins: where a step's device time goes
FAMILIES = [
    ("attention (c2a)", ("_attn_",)),
    ("loss head (c2a)", ("_lce_", "cross_entropy", "_ce_")),
    ("rmsnorm (c2a)", ("rms",)),
    ("rotary (c2a)", ("rotary", "rope")),
    ("swiglu (c2a)", ("swiglu", "silu")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet", "wgmma")),
    ("optimizer", ("adam", "multi_tensor")),
    (
        "collectives / FSDP copies",
        ("nccl", "all_gather", "reduce_scatter", "chunk_cat", "split_with_sizes", "foreach_copy"),
    ),
    ("memcpy / memset", ("memcpy", "memset")),
    ("dtype casts and copies (torch)", ("copy_kernel",)),
    ("other elementwise and reductions (torch)", ("elementwise_kernel", "reduce_kernel")),
]


def profile_step(step, device: torch.device) -> dict[str, Any]:
    """One optimizer step under torch.profiler: wall time, the device's busy time, and that time by kernel
    family (FAMILIES) and by the 25 costliest kernels. The device's busy time is the sum of kernel times (an
    upper bound on the busy span where kernels of several streams overlap)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - start
    kernels = {}
    for e in prof.events():
        # device events, less the GPU-side spans of user annotations (e.g. "Optimizer.step#AdamW.step",
        # "FSDP::post_backward_reduce"), which cover kernels already counted
        if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False):
            entry = kernels.setdefault(e.name, [0.0, 0])
            entry[0] += e.device_time / 1e3  # ms
            entry[1] += 1
    busy = sum(ms for ms, _ in kernels.values())
    families: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        low = name.lower()
        family = next((f for f, keys in FAMILIES if any(k in low for k in keys)), "other")
        families[family] = families.get(family, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "wall_ms": wall * 1e3,
        "device_busy_ms": busy,
        "families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n[:120], "ms": ms, "calls": c} for n, (ms, c) in top],
    }


def hf_model(s: Setup, device: torch.device) -> Any:
    """transformers' LlamaForCausalLM with the Setup's dimensions, fp32 master weights (as HF Trainer keeps
    them), initialised where it trains (1.9B parameters initialised on the CPU would take minutes)."""
    import transformers

    torch.manual_seed(s.seed)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=s.dim,
        intermediate_size=_ffn(s),
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads,
        num_key_value_heads=s.n_kv_heads,
        vocab_size=s.vocab_size,
        max_position_embeddings=max(4096, s.seq_len),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    with device:
        model = transformers.LlamaForCausalLM(hf_cfg)
    model.train()
    return model


def timed_steps(s: Setup, device: torch.device, step: Any, name: str) -> tuple[list[StepStats], float]:
    """`step()` (one optimizer step: (loss tensor, StepStats without seconds)) warmup + steps times, timed."""
    stats, loss = [], math.nan
    for _ in range(s.warmup + s.steps):
        sync(device)
        start = time.perf_counter()
        loss_t, st = step()
        loss = float(loss_t)
        sync(device)
        st.seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite loss {loss}")
        stats.append(st)
    return stats, loss


def hf_step_report(s: Setup, step: Any, optimizer: Any, parameters: int) -> dict[str, Any]:
    """One more optimizer step of an HF-stack side under c2a's step report (aten ops and bytes by family,
    Triton launches), as the c2a sides get it."""
    from c2a.train.step_report import report_step

    report, (_, st) = report_step(step, optimizer, parameters)
    report.trained_tokens = st.trained_tokens
    return {"step_report": report.as_dict(), "step_report_table": report.table()}


def run_baseline(s: Setup, data: SyntheticAlpaca) -> tuple[list[StepStats], dict[str, Any]]:
    import transformers

    device = torch.device(s.device)
    model = hf_model(s, device)
    # HF Trainer's default optimizer: torch AdamW, fused on CUDA since transformers' default for torch >= 2.8
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0, fused=device.type == "cuda")
    order = np.random.default_rng(s.seed + 1).permutation(len(data))  # HF Trainer's RandomSampler
    accum = s.global_batch // s.micro_batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.dtype == "bf16")
    cursor = 0

    def step() -> tuple[torch.Tensor, StepStats]:
        nonlocal cursor
        st, losses = StepStats(0.0, s.global_batch, 0, 0, 0, 0), []
        for _ in range(accum):
            ids, labels, mask = alpaca_collate(data, order[cursor : cursor + s.micro_batch])
            cursor += s.micro_batch
            lengths = mask.sum(dim=1).tolist()  # counted on the host, before the copy: no device sync
            st.trained_tokens += int((labels[:, 1:] != IGNORE).sum())  # HF shifts: position t learns token t+1
            st.tokens, st.positions = st.tokens + sum(lengths), st.positions + ids.numel()
            st.attn_sq += sum(n * n for n in lengths)
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / accum
            loss.backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # HF Trainer's max_grad_norm default
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(losses), st

    stats, loss = timed_steps(s, device, step, "baseline")
    parameters = sum(p.numel() for p in model.parameters())
    info = {
        "batching": f"{s.global_batch} examples = micro-batch {s.micro_batch} x accumulation {accum}, each padded to its longest",
        "parameters": parameters,
        "final_loss": loss,
        "attention": model.config._attn_implementation,
        "transformers": transformers.__version__,
    }
    if s.report:
        info.update(hf_step_report(s, step, optimizer, parameters))
    return stats, info


def run_peer(s: Setup, data: SyntheticAlpaca) -> tuple[list[StepStats], dict[str, Any]]:
    """The stack a user would pick today: transformers' LlamaForCausalLM with Liger-Kernel's fused RMSNorm,
    SwiGLU, RoPE and linear cross-entropy (the logits never materialised), fed padding-free: whole examples
    packed into rows with position_ids restarting at each (transformers detects the packed documents from
    them and masks attention per document; TRL's SFT packing does the same), and torch.compile of the model.
    fp32 master weights under bf16 autocast and fused AdamW, as HF Trainer's --bf16. The rows are c2a's
    loader's (the same packing as the c2a sides, so both train on the same rows): the peer stack is the
    model and its kernels, not the data order. Off CUDA (smoke mode) Liger's Triton kernels are not applied
    (Triton's interpreter stops in Liger's RMSNorm kernel) and nothing is compiled: the rest of the path runs."""
    import transformers
    from liger_kernel.transformers import apply_liger_kernel_to_llama  # ImportError: side_main skips the side

    from c2a.config import DataSection, TrainConfig, TrainSection
    from c2a.train.parallel import Dist
    from c2a.train.run_data import make_loader

    device = torch.device(s.device)
    cuda = device.type == "cuda"
    if cuda:  # patches transformers' Llama classes: before the model is built
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    model = hf_model(s, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0, fused=cuda)
    forward = torch.compile(model) if cuda else model
    cfg = TrainConfig(
        out_dir=tempfile.mkdtemp(prefix="c2a-bench-"),
        data=DataSection(max_len=s.seq_len, packing=True),
        train=TrainSection(global_batch=s.global_batch, micro_batch=s.rows_per_micro, seed=s.seed),
    )
    loader, desc = make_loader(cfg, data, Dist(0, 1, 0, device, None))
    batches = iter(loader)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.dtype == "bf16")

    def step() -> tuple[torch.Tensor, StepStats]:
        micro = [next(batches) for _ in range(loader.accum_steps)]
        st = StepStats(0.0, sum(b.num_examples for b in micro), 0, 0, 0, 0)
        losses = []
        for b in micro:
            st.trained_tokens += b.num_trained
            st.tokens, st.positions = st.tokens + b.num_tokens, st.positions + b.input_ids.numel()
            st.attn_sq += b.sum_len_sq
            b = b.to(device, non_blocking=True)
            # the labels are already shifted (position t's target): transformers' and Liger's losses take them as
            # shift_labels (and compute a loss only when `labels` is given too; it is then not read). No KV cache:
            # transformers 5.25 looks for packed documents in position_ids only without one (with it, the rows'
            # documents attend to each other: 0.5 max logit difference on a tiny model, 1.5e-7 without)
            with autocast:
                out = forward(
                    input_ids=b.input_ids,
                    position_ids=b.position_ids,
                    labels=b.labels,
                    shift_labels=b.labels,
                    use_cache=False,
                )
            loss = out.loss / len(micro)
            loss.backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(losses), st

    stats, loss = timed_steps(s, device, step, "peer")  # warmup steps include the compilation
    parameters = sum(p.numel() for p in model.parameters())
    info = {
        "batching": desc,
        "parameters": parameters,
        "final_loss": loss,
        "attention": model.config._attn_implementation,
        "transformers": transformers.__version__,
        "liger_kernel": importlib.metadata.version("liger-kernel"),
        "liger_kernels_applied": cuda,
        "compiled": cuda,
    }
    if s.report:
        info.update(hf_step_report(s, step, optimizer, parameters))
    return stats, info


def alpaca_collate(data: SyntheticAlpaca, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stanford Alpaca's preprocessing of one micro-batch: input_ids = the whole example, labels = a copy
    with the prompt's positions -100, both right-padded to the longest example (labels with -100),
    attention_mask = input_ids != pad."""
    seqs = [torch.from_numpy(data.tokens(int(i))) for i in indices]
    labels = []
    for i, t in zip(indices, seqs):
        y = t.clone()
        y[: data.prompt_len[int(i)]] = IGNORE
        labels.append(y)
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=PAD)
    labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE)
    return ids, labels, ids.ne(PAD)


def _ffn(s: Setup) -> int:
    from c2a.config import meta_ffn_hidden_dim

    return meta_ffn_hidden_dim(s.dim, 256, None)


# ----------------------------------------------------------------------------------------- one process


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def side_main(side: str, s: Setup, out: Path) -> None:
    """One side in this (fresh) process; writes its summary as JSON to `out`."""
    device = torch.device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    data = SyntheticAlpaca(s)
    rss_before = peak_memory_mib(torch.device("cpu"))
    if side in C2A_SIDES:
        stats, info = run_c2a(s, data, settings=C2A_SIDES[side])
    elif side == "peer":
        try:
            stats, info = run_peer(s, data)
        except ImportError as e:  # no Liger-Kernel on this machine: said so, not a failure
            out.write_text(json.dumps({"side": side, "skipped": f"peer stack skipped: {PEER_MISSING} ({e})"}))
            return
    else:
        stats, info = run_baseline(s, data)
    timed = stats[s.warmup :]
    seconds = sum(t.seconds for t in timed)
    summary: dict[str, Any] = {
        "side": side,
        "trained_tokens_per_s": sum(t.trained_tokens for t in timed) / seconds,
        "tokens_per_s": sum(t.tokens for t in timed) / seconds,
        "padding_fraction": 1 - sum(t.tokens for t in timed) / sum(t.positions for t in timed),
        "step_seconds": seconds / len(timed),
        "examples_per_step": sum(t.examples for t in timed) / len(timed),
        "peak_memory_mib": peak_memory_mib(device),
        "rss_before_model_mib": rss_before,
        "step_seconds_each": [t.seconds for t in stats],
        "trained_tokens_each": [t.trained_tokens for t in stats],
        # the fastest timed step: the rate least disturbed by other processes on a shared machine
        "best_step_trained_tokens_per_s": max(t.trained_tokens / t.seconds for t in timed),
        "threads": torch.get_num_threads(),
        **info,
    }
    if device.type == "cuda":
        from c2a.config import LlamaConfig
        from c2a.model.flops import attention_flops, matmul_flops_per_token, peak_flops

        cfg = LlamaConfig(
            dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, vocab_size=s.vocab_size
        )
        flops = sum(t.tokens for t in timed) * matmul_flops_per_token(cfg) + attention_flops(
            cfg, sum(t.attn_sq for t in timed)
        )
        peak = peak_flops(device)
        summary["model_tflops_per_s"] = flops / seconds / 1e12
        summary["mfu"] = flops / seconds / peak if peak else None
    out.write_text(json.dumps(summary, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# -------------------------------------------------------------------------------------------- the run


def run_side(side: str, s: Setup, env: dict[str, str], budget: float | None = None) -> dict[str, Any]:
    """One side in a fresh process: its summary, or {"side", "error"} when it failed or ran past `budget`
    seconds, or {"side", "skipped"}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{side}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--side",
            side,
            "--setup",
            json.dumps(asdict(s)),
            "--side-out",
            str(out),
        ]
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=budget)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-3000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"side": side, "error": f"timed out after its budget of {budget:.0f} s", "log_tail": tail}
        if proc.returncode != 0:
            return {
                "side": side,
                "error": f"exit {proc.returncode}",
                "log_tail": proc.stdout[-2000:] + "\n" + proc.stderr[-4000:],
            }
        return json.loads(out.read_text())


ROWS = [  # (label, key, format)
    ("trained tokens/s", "trained_tokens_per_s", "{:,.0f}"),
    ("  best step", "best_step_trained_tokens_per_s", "{:,.0f}"),
    ("all tokens/s", "tokens_per_s", "{:,.0f}"),
    ("padding fraction", "padding_fraction", "{:.1%}"),
    ("step time (s)", "step_seconds", "{:.2f}"),
    ("examples / step", "examples_per_step", "{:.1f}"),
    ("peak memory (MiB)", "peak_memory_mib", "{:,.0f}"),
    ("MFU", "mfu", "{:.1%}"),
]


def table(results: dict[str, dict[str, Any]], memory_kind: str) -> str:
    """Each measured side's numbers, and c2a / baseline where both were measured."""
    names = list(results)
    ratio = "c2a" in results and "baseline" in results
    lines = [f"{'':<22}" + "".join(f"{n:>14}" for n in names) + (f" {'c2a / baseline':>15}" if ratio else "")]
    for label, key, fmt in ROWS:
        if all(results[n].get(key) is None for n in names):
            continue
        cells = "".join(f"{fmt.format(results[n][key]) if results[n].get(key) is not None else '-':>14}" for n in names)
        if ratio and results["c2a"].get(key) is not None and results["baseline"].get(key):
            cells += f" {results['c2a'][key] / results['baseline'][key]:>14.2f}x"
        name = f"peak {memory_kind} (MiB)" if key == "peak_memory_mib" else label
        lines.append(f"{name:<22}{cells}")
    return "\n".join(lines)


# side A / side B, when both were measured: the goals read from these
COMPARISONS = [("c2a-new", "c2a"), ("c2a-fp8", "c2a-new"), ("c2a-new", "peer"), ("c2a-new", "baseline")]


def comparisons(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for a, b in COMPARISONS:
        if a in results and b in results:
            out[f"{a} / {b}"] = {
                key: results[a][key] / results[b][key]
                for _, key, _ in ROWS
                if results[a].get(key) is not None and results[b].get(key)
            }
    return out


def plot(results: dict[str, dict[str, Any]], s: Setup, path: Path, smoke: bool, memory_kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("trained tokens/s", "trained_tokens_per_s"),
        ("all tokens/s", "tokens_per_s"),
        (f"peak {memory_kind} (MiB)", "peak_memory_mib"),
        ("padding fraction", "padding_fraction"),
    ]
    names = list(results)
    colors = {"baseline": "tab:gray", "peer": "tab:orange"}
    fig, axes = plt.subplots(1, 4, figsize=(4 + 3 * len(names), 4.2))
    for ax, (label, key) in zip(axes, panels):
        values = [results[n][key] for n in names]
        bars = ax.bar(names, values, color=[colors.get(n, "tab:blue") for n in names])
        ax.set_title(label)
        ax.tick_params(axis="x", labelsize=8)
        ax.bar_label(bars, [f"{v:.1%}" if key == "padding_fraction" else f"{v:,.0f}" for v in values], fontsize=8)
    where = "smoke run (tiny model)" if smoke else f"{s.device}"
    fig.suptitle(
        f"training throughput, {where}: dim {s.dim}, {s.n_layers} layers, vocab {s.vocab_size}, "
        f"{s.global_batch} examples/step, Alpaca-like lengths"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip() or None
        except OSError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": torch.cuda.get_device_name()
        if CUDA
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 steps: checks both paths run (CI)")
    ap.add_argument("--device", default="cuda" if CUDA else "cpu")
    for name in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "seq_len",
        "global_batch",
        "micro_batch",
        "rows_per_micro",
        "steps",
        "warmup",
    ):
        ap.add_argument("--" + name.replace("_", "-"), type=int, dest=name, help="override the default for the machine")
    ap.add_argument("--threads", type=int, help="torch intra-op threads on both sides (default: torch's)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"))
    ap.add_argument(
        "--sides",
        default="c2a,baseline",
        help=f"which sides to run, comma-separated, of {', '.join(SIDES)} (gpu_check runs all)",
    )
    ap.add_argument(
        "--budgets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hold each side to its SIDE_BUDGET_S seconds (default: on CUDA)",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs per side, alternating; each side reports its fastest run"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        default=None,
        help="c2a sides: profile one more step (device time by kernel family)",
    )
    ap.add_argument(
        "--report",
        action="store_true",
        default=None,
        help="every side: one more step under the step report (aten ops and bytes by family, Triton launches)",
    )
    ap.add_argument(
        "--c2a-set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="c2a sides: a train setting, e.g. gather_once=true (repeatable)",
    )
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side, this process
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side:
        raw = json.loads(args.setup)
        raw["prompt_range"], raw["response_range"] = tuple(raw["prompt_range"]), tuple(raw["response_range"])
        raw["c2a_set"] = tuple(raw["c2a_set"])
        side_main(args.side, Setup(**raw), args.side_out)
        return

    values = default_setup(args.smoke, args.device)
    fields = {f.name for f in dataclasses.fields(Setup)}
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    values["c2a_set"] = tuple(values.get("c2a_set", ()))
    s = Setup(**values)
    if s.global_batch % s.micro_batch:
        ap.error(f"--global-batch ({s.global_batch}) must be a multiple of --micro-batch ({s.micro_batch})")
    sides = args.sides.split(",")
    unknown = [x for x in sides if x not in SIDES]
    if unknown:
        ap.error(f"unknown side {unknown[0]!r}; valid: {', '.join(SIDES)}")
    budgets = args.budgets if args.budgets is not None else s.device.startswith("cuda")
    sys.exit(run_all(s, sides, args.repeats, args.out, args.smoke, budgets))


def run_all(s: Setup, sides: list[str], repeats: int, out: Path, smoke: bool, budgets: bool) -> int:
    """Every side `repeats` times, alternating; the table, JSON and plot. 1 when a side failed (the others'
    numbers are written all the same)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    memory_kind = "max allocated" if s.device.startswith("cuda") else "RSS"
    print(f"setup: {asdict(s)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "train_throughput.json"
    summary: dict[str, Any] = {"environment": environment(), "setup": asdict(s), "smoke": smoke, "sides": {}}
    results, failed = summary["sides"], summary.setdefault("failed", {})
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    summary["runs"] = runs
    for _repeat in range(repeats):
        for side in sides:  # alternating, so that a busy spell on a shared machine does not hit one side only
            start = time.perf_counter()
            if side == "peer" and importlib.util.find_spec("liger_kernel") is None:  # not worth a process
                r = {"side": side, "skipped": f"peer stack skipped: {PEER_MISSING} (liger_kernel is not importable)"}
            else:
                r = run_side(side, s, env, SIDE_BUDGET_S[side] if budgets else None)
            if "error" in r or "skipped" in r:
                print(f"{side}: {r.get('skipped') or 'FAILED: ' + r['error']}\n{r.get('log_tail', '')}", flush=True)
                if "error" in r:
                    failed[side] = r
                else:
                    summary.setdefault("skipped", {})[side] = r["skipped"]
                json_path.write_text(json.dumps(summary, indent=1) + "\n")
                continue
            runs[side].append(r)
            print_side(side, r, time.perf_counter() - start)
            # the side's result: its fastest run (the least disturbed), with the highest peak of all its runs
            results[side] = {
                **max(runs[side], key=lambda x: x["trained_tokens_per_s"]),
                "peak_memory_mib": max(x["peak_memory_mib"] for x in runs[side]),
                "runs": len(runs[side]),
            }
            summary["environment"]["load_average_after"] = os.getloadavg()
            json_path.write_text(json.dumps(summary, indent=1) + "\n")  # after each run: a later failure keeps this one
    if "c2a" in results and "baseline" in results:
        c2a, base = results["c2a"], results["baseline"]
        summary["ratios"] = {
            key: c2a[key] / base[key] for _, key, _ in ROWS if c2a.get(key) is not None and base.get(key)
        }
    summary["comparisons"] = comparisons(results)
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    if results:
        print(table(results, memory_kind))
        for name, ratios in summary["comparisons"].items():
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        plot(results, s, out / "train_throughput.png", smoke, memory_kind)
    print(f"wrote {json_path}" + (f" and {out / 'train_throughput.png'}" if results else ""))
    return 1 if failed else 0


def print_side(side: str, r: dict[str, Any], seconds: float) -> None:
    print(
        f"{side}: {r['trained_tokens_per_s']:,.0f} trained tokens/s (best step {r['best_step_trained_tokens_per_s']:,.0f}), "
        f"{r['peak_memory_mib']:,.0f} MiB peak ({seconds:.0f} s)"
        + (f"; settings {r['settings']}" if "settings" in r else ""),
        flush=True,
    )
    if "step_report_table" in r:
        print(r["step_report_table"], flush=True)
    if "profile" in r:
        prof = r["profile"]
        print(
            f"{side} profiled step: {prof['wall_ms']:.1f} ms wall, {prof['device_busy_ms']:.1f} ms of kernels: "
            + ", ".join(f"{k} {v:.1f}" for k, v in prof["families_ms"].items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
