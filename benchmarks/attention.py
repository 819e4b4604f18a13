"""Attention throughput: c2a's Triton FlashAttention-2 kernel against torch SDPA (flash backend) and
flash-attn (where installed), forward and forward + backward.

    python benchmarks/attention.py [--out DIR] [--seqlens 512,1024,...] [--head-dims 64,128] [--sweep]

Cases (bf16, 32 query heads, batch × T = 16384 tokens so every T fills the card alike):
  dense   causal, MHA, T = 512 … 16384, head dims 64 and 128;
  gqa     32 query heads on 8 key/value heads against 32 on 32, Hd 128, T = 4096 and 8192;
  packed  Alpaca-like documents (lengths log-uniform in 50…1500 tokens, median ≈ 270) packed first-fit into
          4 rows of 4096, the rest of each row a padding document; against SDPA run per document (and
          flash-attn's varlen kernel), TFLOP/s counting only the real documents' causal FLOPs.
FLOPs: causal forward = half the dense 4·B·H·T²·Hd; backward = 2.5 × forward (its five matmuls against
the forward's two), so forward + backward = 3.5 × forward, whatever a kernel actually recomputes.
Every c2a row first checks its forward output against SDPA's (max |difference| in the table). c2a-tma is c2a
with the tensor-descriptor forward of c2a/kernels/attention_tma.py (C2A_ATTN_FWD=tma in the model; Hopper and
newer), the backward unchanged.

Without CUDA the script says so and runs a smoke mode (`--smoke` asks for it on a GPU too): tiny fp32 shapes,
under Triton's CPU interpreter and timed with a wall clock there (times of the interpreter, not the kernel).
Writes DIR/attention.json and DIR/attention.png; prints a table; never asserts a time.

    python benchmarks/attention.py --compile-only [--arch 90,80] [--models 7b,13b,70b] [--head-dims 128] [--sweep]

needs no GPU: builds the kernels' default tiles (bf16, T 4096, packed and not, both backward paths) at the
heads of Llama-2 7B (32:32), 13B (40:40) and 70B (64:8) for CUDA sm_<arch> with Triton's real compiler and
bundled ptxas; prints registers, spill bytes, shared memory, whether TMA and wgmma are used, and the issued
÷ useful tensor-core FLOPs of the worst dot and of all dots (1.00: no tensor-core work done twice; method in
benchmarks/gpu_compile.py), writes DIR/attention_compile.json, and exits 1 if a default build fails. For
sm_90 and newer it also builds attention_tma.py's tensor-descriptor forward (C2A_ATTN_FWD=tma, tma_ws; kind
"tma", "tma_ws", never a failure) and reports the warp-specialised partitions Triton made. With
--sweep the SWEEP tiles at Hd 128 are built too (reported, never a failure: some are expected not to fit).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

# Smoke mode's interpreter runs tl.dot as numpy matmul: keep OpenBLAS to one thread (see tests/conftest.py)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch

CUDA = torch.cuda.is_available()
COMPILE_ONLY = "--compile-only" in sys.argv  # compiles for a GPU target: needs Triton's compiler, not its interpreter
if COMPILE_ONLY:
    os.environ.pop("TRITON_INTERPRET", None)  # an interpreted kernel cannot be compiled (tests' conftest sets it)
elif not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported, which reads it at decoration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from c2a.kernels import attention, attention_tma  # noqa: E402
from c2a.kernels.attention import flash_attention  # noqa: E402
from c2a.kernels.attention_tma import flash_attention_tma  # noqa: E402

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None
try:  # torchtitan's two packed-document paths, where this torch has them
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None

DEVICE = torch.device("cuda" if CUDA else "cpu")
SDPA_NAME = "sdpa-flash" if CUDA else "sdpa-math"


@dataclass
class Row:
    case: str  # dense | gqa | packed
    provider: str  # c2a | c2a-deterministic | c2a-tma | sdpa-flash (sdpa-math on CPU) | flash-attn | sdpa-per-doc
    #                flash-attn-varlen | torch-varlen | flex-doc-causal
    mode: str  # fwd | fwd+bwd
    B: int
    T: int
    H: int
    K: int
    Hd: int
    ms: float
    tflops: float
    max_diff: float | None = None  # c2a's forward against SDPA's, same inputs


# ------------------------------------------------------------------------------------------------ timing


# milliseconds do_bench spends timing each case (after 25 ms of warm-up): --rep-ms (gpu_check uses 40)
REP_MS = 100


def bench_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor]) -> float:
    """Mean milliseconds per call: triton.testing.do_bench on CUDA (L2 flushed between calls), else a
    wall clock over a few calls (the interpreter's time, not the kernel's)."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=REP_MS, grad_to_none=grad_to_none)
    fn()  # trace once
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def causal_flops(H: int, Hd: int, lengths: list[int]) -> float:
    """Forward FLOPs of causal attention over documents of these lengths: half of 4·L²·Hd per head."""
    return sum(2.0 * H * Hd * L * L for L in lengths)


def timed(
    fwd: Callable[[], torch.Tensor],
    leaves: list[torch.Tensor],
    do: torch.Tensor,
    mode: str,
    deterministic: bool = False,
) -> float:
    """`deterministic` times c2a's deterministic backward (its separate dQ pass instead of fp32 atomics),
    which torch's deterministic mode selects; torch's filling of uninitialised memory in that mode is
    turned off meanwhile so that only the kernels differ."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        if mode == "fwd":
            with torch.no_grad():
                return bench_ms(fwd, [])
        return bench_ms(lambda: fwd().backward(do), leaves)
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]


# ------------------------------------------------------------------------------------------------ inputs


def make_qkv(B: int, T: int, H: int, K: int, Hd: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q [B, T, H, Hd], k, v [B, T, K, Hd] (leaves that require grad), dO [B, T, H, Hd]."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, T, n, Hd, device=DEVICE, dtype=dtype, generator=gen).requires_grad_() for n in (H, K, K))
    do = torch.randn(B, T, H, Hd, device=DEVICE, dtype=dtype, generator=gen)
    return q, k, v, do


def alpaca_like_rows(rows: int, T: int, lo: int = 50, hi: int = 1500, seed: int = 0) -> list[list[int]]:
    """Per row, the document lengths packed first-fit into T tokens; a last padding document fills the
    rest (marked by a negative length)."""
    gen = torch.Generator().manual_seed(seed)
    packed: list[list[int]] = [[] for _ in range(rows)]
    free = [T] * rows
    while True:
        n = int(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand((), generator=gen).item()))
        n = min(n, T)
        fits = [r for r in range(rows) if free[r] >= n]
        if not fits:
            break
        packed[fits[0]].append(n)
        free[fits[0]] -= n
    for r in range(rows):
        if free[r]:
            packed[r].append(-free[r])
    return packed


def position_ids_of(rows: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(abs(n)) for n in row]) for row in rows]).to(DEVICE)


# ------------------------------------------------------------------------------------------------ providers


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch SDPA on the same [B, T, heads, Hd] tensors (transposed views, as a model would pass them),
    flash backend on CUDA; GQA through enable_gqa."""
    backends = [SDPBackend.FLASH_ATTENTION] if CUDA else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=q.shape[2] != k.shape[2]
        )
    return o.transpose(1, 2)


def sdpa_per_document(q, k, v, spans: list[list[tuple[int, int]]]) -> torch.Tensor:
    """SDPA once per document, spans precomputed on the host (so no sync is timed), outputs concatenated."""
    rows = []
    for b, row in enumerate(spans):
        rows.append(torch.cat([sdpa(q[b : b + 1, s:e], k[b : b + 1, s:e], v[b : b + 1, s:e]) for s, e in row], dim=1))
    return torch.cat(rows)


def torch_varlen(q, k, v, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """torch.nn.attention.varlen (FlashAttention under torch) over the packed tokens as one sequence list."""
    B, T, H, Hd = q.shape
    flat = [x.reshape(B * T, x.shape[2], Hd) for x in (q, k, v)]
    causal = (
        {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters else {"is_causal": True}
    )
    gqa = {"enable_gqa": True} if k.shape[2] != H else {}
    return varlen_attn(*flat, cu_seqlens, cu_seqlens, max_len, max_len, **causal, **gqa).view(B, T, H, Hd)


_flex = None
PARTIAL: Path | None = None  # where run_case rewrites the rows so far (main sets DIR/attention.json)


def flex_document_causal(q, k, v, position_ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """FlexAttention with a block-causal document mask (compiled once; the mask's blocks built once, as a
    trainer would per batch), for q/k/v [B, T, heads, Hd]."""
    global _flex
    _flex = _flex or torch.compile(flex_attention, dynamic=False)
    B, T, H, _ = q.shape
    doc = (position_ids == 0).cumsum(1)  # [B, T] document number of each token

    def mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    block_mask = create_block_mask(mask, B, None, T, T, device=q.device)
    gqa = k.shape[2] != H
    return lambda: _flex(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)


def flash_attn_varlen(q, k, v, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    B, T, H, Hd = q.shape
    o = flash_attn_varlen_func(
        q.reshape(B * T, H, Hd),
        k.reshape(B * T, -1, Hd),
        v.reshape(B * T, -1, Hd),
        cu_seqlens,
        cu_seqlens,
        max_len,
        max_len,
        causal=True,
    )
    return o.view(B, T, H, Hd)


# c2a's providers that run attention_tma.py's forward instead of the pointer one ("c2a"), the backward unchanged:
# provider -> warp_specialize. "tma_ws" is left out while Triton does not warp-specialise its loop on Hopper
# (attention_tma.py's module docstring)
TMA_PROVIDERS = {"c2a-tma": False}


# ------------------------------------------------------------------------------------------------ cases


def run_dense(seqlens: list[int], head_dims: list[int], H: int, tokens: int, dtype, rows: list[Row]) -> None:
    for Hd in head_dims:
        for T in seqlens:
            B = max(1, tokens // T)
            run_case("dense", B, T, H, H, Hd, dtype, None, rows)


def run_case(case: str, B: int, T: int, H: int, K: int, Hd: int, dtype, packing, rows: list[Row]) -> None:
    q, k, v, do = make_qkv(B, T, H, K, Hd, dtype)
    leaves = [q, k, v]
    if packing is None:
        flops = B * causal_flops(H, Hd, [T])
        position_ids = None
        providers = {
            "c2a": lambda: flash_attention(q, k, v),
            "c2a-deterministic": lambda: flash_attention(q, k, v),
            SDPA_NAME: lambda: sdpa(q, k, v),
        }
        if flash_attn_func is not None:
            providers["flash-attn"] = lambda: flash_attn_func(q, k, v, causal=True)
    else:
        flops = causal_flops(H, Hd, [n for row in packing for n in row if n > 0])  # real documents only
        position_ids = position_ids_of(packing)
        spans = attention.document_bounds(position_ids)
        providers = {
            "c2a": lambda: flash_attention(q, k, v, position_ids),
            "c2a-deterministic": lambda: flash_attention(q, k, v, position_ids),
            "sdpa-per-doc": lambda: sdpa_per_document(q, k, v, spans),
        }
        starts = [b * T + s for b, row in enumerate(spans) for s, _ in row] + [B * T]
        cu = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
        max_len = max(e - s for row in spans for s, e in row)
        if flash_attn_varlen_func is not None:
            providers["flash-attn-varlen"] = lambda: flash_attn_varlen(q, k, v, cu, max_len)
        if CUDA and varlen_attn is not None:
            providers["torch-varlen"] = lambda: torch_varlen(q, k, v, cu, max_len)
        if CUDA and flex_attention is not None:
            try:
                providers["flex-doc-causal"] = flex_document_causal(q, k, v, position_ids)
            except Exception as err:
                print(f"  {case} flex-doc-causal: skipped ({type(err).__name__}: {str(err)[:100]})")
    for name, warp_specialize in TMA_PROVIDERS.items():
        providers[name] = lambda ws=warp_specialize: flash_attention_tma(q, k, v, position_ids, warp_specialize=ws)
    with torch.no_grad():
        want = sdpa(q, k, v) if packing is None else sdpa_per_document(q, k, v, spans)
        diffs = {}
        for name in ("c2a", *TMA_PROVIDERS):
            try:
                diffs[name] = (providers[name]().float() - want.float()).abs().max().item()
            except Exception as err:  # e.g. TMA on a GPU before Hopper: its rows are skipped below
                print(f"  {case} {name} T={T} Hd={Hd}: forward check failed ({type(err).__name__}: {str(err)[:100]})")
                providers.pop(name)
    for mode in ("fwd", "fwd+bwd"):
        for name, fwd in providers.items():
            if mode == "fwd" and name == "c2a-deterministic":
                continue  # the same forward as c2a's; only the backward differs
            try:
                ms = timed(fwd, leaves, do, mode, deterministic=name == "c2a-deterministic")
            except Exception as err:  # a baseline without this shape/dtype/GQA support: report, go on
                print(f"  {case} {name} {mode} T={T} Hd={Hd}: skipped ({type(err).__name__}: {str(err)[:100]})")
                continue
            total = flops * (1.0 if mode == "fwd" else 3.5)
            diff = diffs.get(name, diffs["c2a"]) if name.startswith("c2a") else None
            rows.append(Row(case, name, mode, B, T, H, K, Hd, ms, total / ms / 1e9, diff))
            print(format_row(rows[-1]), flush=True)
            if PARTIAL is not None:  # rewritten after every row: a stage's time limit keeps what was measured
                PARTIAL.write_text(
                    json.dumps(
                        {"environment": environment(False), "rows": [asdict(r) for r in rows], "partial": True},
                        indent=1,
                    )
                )


def format_row(r: Row) -> str:
    diff = "" if r.max_diff is None else f"{r.max_diff:9.2e}"
    return (
        f"{r.case:7s} {r.provider:18s} {r.mode:8s} {r.B:3d} {r.T:6d} {r.H:3d} {r.K:3d} {r.Hd:4d} "
        f"{r.ms:10.3f} {r.tflops:8.4g} {diff}"
    )


HEADER = (
    f"{'case':7s} {'provider':18s} {'mode':8s} {'B':>3s} {'T':>6s} {'H':>3s} {'K':>3s} {'Hd':>4s} "
    f"{'ms':>10s} {'TFLOP/s':>8s} {'max|diff|':>9s}"
)


# ------------------------------------------------------------------------------------------------ sweep


# (BLOCK_M, BLOCK_N, num_warps, num_stages) alternatives to each kernel's default, for Hd 128
# (timed on an H200 on 2026-12-04: benchmarks/RESULTS.md). The sweep times each kernel's default first, in the
# same process as its alternatives, in this order (a stage's time limit keeps the first ones).
SWEEP = {
    "_bwd_dq_blocks": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    "_bwd_dkdv_blocks": [(32, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3), (64, 64, 8, 3), (32, 64, 8, 2)],
    "_fwd_blocks": [(128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (128, 32, 8, 3)],
    # attention_tma.py's tensor-descriptor forward (sm_90+), timed through it
    "_fwd_tma_blocks": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2)],
}
SWEEP_TMA = {"_fwd_tma_blocks"}  # tile functions of attention_tma.py; the others are attention.py's


def tiles_module(name: str) -> ModuleType:
    """The kernel module whose tile function `name` is (and whose forward times and builds it)."""
    return attention_tma if name in SWEEP_TMA else attention


def sweep(T: int, Hd: int, H: int, tokens: int, dtype, out: Path | None = None, packing=None) -> list[dict]:
    """Times each kernel's alternative tile sizes (BLOCK_M, BLOCK_N, warps, stages), the others at their
    defaults: the forward by forward time, the two backward passes by forward + backward time (the dQ
    pass's tiles on the deterministic path, which is the one that runs it). First on dense rows (B × T =
    `tokens`); given `packing` (rows of document lengths, as `alpaca_like_rows` makes them), also the
    forward and dK/dV tiles on those packed rows, where short documents may favour other tiles. With `out`, the
    results so far are rewritten there after every candidate, so a time limit keeps what was measured."""
    B = max(1, tokens // T)
    q, k, v, do = make_qkv(B, T, H, H, Hd, dtype)
    names = [n for n in SWEEP if (CUDA and torch.cuda.get_device_capability() >= (9, 0)) or n not in SWEEP_TMA]
    plans = [("dense", name, None) for name in names]
    if packing is not None:  # after the first dense kernel (the dQ pass): the ones the packed rows run
        pos = position_ids_of(packing)
        plans[1:1] = [("packed", n, pos) for n in ("_fwd_blocks", "_fwd_tma_blocks", "_bwd_dkdv_blocks") if n in names]
        qp, kp, vp, dop = make_qkv(len(packing), T, H, H, Hd, dtype)
    results = []
    for case, name, position_ids in plans:
        x = (q, k, v, do) if position_ids is None else (qp, kp, vp, dop)
        module = tiles_module(name)
        default = getattr(module, name)
        run = flash_attention_tma if name in SWEEP_TMA else flash_attention
        mode = "fwd" if name.startswith("_fwd") else "fwd+bwd"
        mine = tuple(vars(default(Hd, dtype)).values())  # the default tile, timed beside its alternatives
        for cand in [mine] + [c for c in SWEEP[name] if c != mine]:
            setattr(module, name, lambda head_dim, dtype, c=cand: attention._Blocks(*c))
            try:
                ms = timed(
                    lambda: run(x[0], x[1], x[2], position_ids),
                    list(x[:3]),
                    x[3],
                    mode,
                    deterministic=name == "_bwd_dq_blocks",
                )
            except Exception as err:  # e.g. out of shared memory for this tile/stage count
                ms = float("nan")
                print(f"  {name} {cand}: {type(err).__name__}: {str(err)[:100]}")
            finally:
                setattr(module, name, default)
            results.append(
                {
                    "case": case,
                    "kernel": name,
                    "blocks": cand,
                    "default": cand == mine,
                    "mode": mode,
                    "T": T,
                    "Hd": Hd,
                    "ms": ms,
                }
            )
            print(
                f"sweep {case:6s} {name:18s} {cand!s:18s} {mode:8s} {ms:9.3f} ms{' (default)' if cand == mine else ''}",
                flush=True,
            )
            if out is not None:
                out.write_text(json.dumps({"environment": environment(False), "sweep": results}, indent=1))
    return results


# ------------------------------------------------------------------------------------------------ compile only


# Llama-2's attention shapes (query heads, key/value heads); every size has head dim 128
MODELS = {"7b": (32, 32), "13b": (40, 40), "70b": (64, 8)}


# C2A_ATTN_FWD's values that run attention_tma.py's forward -> its warp_specialize; the compile-only report
# builds each (kind "tma", "tma_ws")
TMA_FORWARDS = {"tma": False, "tma_ws": True}


def record_launches(
    arch: int,
    H: int,
    K: int,
    Hd: int,
    packed: bool,
    deterministic: bool | None,
    blocks: tuple | None,
    name: str | None,
    variant: str,
) -> list:
    """The kernel launches of one build, recorded on meta tensors, not run (bf16, T 4096, batch 1): for variant
    "pointer" attention.py's forward and backward (`deterministic` picks the dQ path; None: a launcher with
    one), for "tma" and "tma_ws" attention_tma.py's forward alone. With `name`, that tile function returns
    `blocks` meanwhile; the launchers pick tiles for compute capability `arch`."""
    from benchmarks.gpu_compile import capture_launches

    meta = torch.device("meta")
    q = torch.empty(1, 4096, H, Hd, device=meta, dtype=torch.bfloat16)
    k = torch.empty(1, 4096, K, Hd, device=meta, dtype=torch.bfloat16)
    doc_start = doc_end = None
    if packed:
        doc_start, doc_end = (torch.empty(1, 4096, device=meta, dtype=torch.int32) for _ in range(2))
    module = tiles_module(name) if name else None
    default = getattr(module, name) if name else None
    if name:
        module.__dict__[name] = lambda head_dim, dtype: attention._Blocks(*blocks)
    extra = {} if deterministic is None else {"deterministic": deterministic}
    target = attention._target_capability
    attention._target_capability = lambda: divmod(arch, 10)  # the tiles the launcher picks for this target
    try:
        with capture_launches(attention, attention_tma) as recorded:
            if variant in TMA_FORWARDS:  # the forward alone: its backward is attention.py's, built in the pointer rows
                attention_tma.attention_forward_tma(q, k, torch.empty_like(k), doc_start, TMA_FORWARDS[variant])
            else:
                o, lse = attention.attention_forward(q, k, torch.empty_like(k), doc_start)
                attention.attention_backward(
                    torch.empty_like(o), q, k, torch.empty_like(k), o, lse, doc_start, doc_end, **extra
                )
    finally:
        attention._target_capability = target
        if name:
            module.__dict__[name] = default
    return recorded


def compile_report(archs: list[int], models: list[str], head_dims: list[int], with_sweep: bool) -> list[dict]:
    """Builds every kernel for CUDA sm_<arch> on a machine without a GPU (Triton's compiler and its bundled
    ptxas) and reports registers per thread, bytes spilled, shared memory, TMA and wgmma use and the
    issued / useful tensor-core FLOPs (benchmarks/gpu_compile.py's mma_report): the defaults for bf16, T =
    4096, packed and not, for each model's heads, through both backward paths (the atomic dQ and the
    deterministic one, where the launcher has both); then (with_sweep) the SWEEP tiles at Hd 128, packed,
    the last model's heads. The launchers run on meta tensors with their kernels recorded, so each build
    has the arguments, specialisations (e.g. GROUP = 1 for MHA), tiles and warps of a real launch; launches
    that specialise alike (e.g. the delta kernel for every model) are built once, their models listed."""
    import inspect

    from benchmarks.gpu_compile import compile_launch, specialise

    # launchers without a deterministic switch (before the atomic dQ) have one backward path
    has_paths = "deterministic" in inspect.signature(attention.attention_backward).parameters
    paths = {"atomic": False, "deterministic": True} if has_paths else {"default": None}

    jobs = [
        (arch, model, Hd, packed, path, None, None, "default", "pointer")
        for arch in archs
        for Hd in head_dims
        for model in models
        for packed in (False, True)
        for path in paths
    ]
    # attention_tma.py's forward (TMA: sm_90 and newer), at its own default tiles
    jobs += [
        (arch, model, Hd, packed, "forward only", None, None, variant, variant)
        for arch in archs
        if arch >= 90
        for variant in TMA_FORWARDS
        for Hd in head_dims
        for model in models
        for packed in (False, True)
    ]
    if with_sweep:
        # the dQ pass runs on the deterministic path only (where the launcher has two)
        sweep_path = {
            name: "deterministic" if name == "_bwd_dq_blocks" and has_paths else next(iter(paths)) for name in SWEEP
        }
        jobs += [
            (arch, models[-1], 128, True, sweep_path[name], c, name, "sweep", "tma" if name in SWEEP_TMA else "pointer")
            for arch in archs
            for name, cands in SWEEP.items()
            if hasattr(tiles_module(name), name) and (arch >= 90 or name not in SWEEP_TMA)
            for c in cands
        ]
    results, seen = [], {}
    print(
        f"{'arch':6s} {'kernel':26s} {'Hd':>3s} {'packed':6s} {'models':11s} {'backward path':20s} "
        f"{'tile (M, N, warps, stages)':27s} "
        f"{'regs':>4s} {'spill':>5s} {'smem':>4s} {'TMA':3s} {'wgmma':5s} {'mma issued/useful'}"
    )
    for arch, model, Hd, packed, path, blocks, name, kind, variant in jobs:
        H, K = MODELS[model]
        for launch in record_launches(arch, H, K, Hd, packed, paths.get(path), blocks, name, variant):
            kernel = launch.kernel.fn.__name__
            signature, constexprs, attrs, options = specialise(launch, arch)
            key = (arch, kernel, repr(signature), repr(constexprs), repr(attrs), options.num_warps, options.num_stages)
            if key in seen:  # e.g. the delta kernel, the same for every tile choice; 7b and 13b alike
                row = seen[key]
                for field, value in (("models", model), ("backward", path), ("kind", kind)):
                    if value not in row[field]:
                        row[field].append(value)
                continue
            names = launch.kernel.arg_names
            consts = {names[p[0]]: value for p, value in constexprs.items()}
            tile = (consts.get("BLOCK_M"), consts.get("BLOCK_N"), options.num_warps, options.num_stages)
            try:
                r = compile_launch(launch, arch)
            except Exception as err:  # e.g. a tile that does not fit: report and go on
                r = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            row = {
                "arch": arch,
                "kernel": kernel,
                "Hd": Hd,
                "packed": packed,
                "models": [model],
                "backward": [path],
                "blocks": tile,
                "kind": [kind],
                **r,
            }
            seen[key] = row
            results.append(row)
            print(compile_row(row), flush=True)
    return results


def compile_row(r: dict) -> str:
    head = (
        f"sm_{r['arch']:<3d} {r['kernel']:26s} {r['Hd']:3d} {r['packed']!s:6s} {','.join(r['models']):11s} "
        f"{'/'.join(r['backward']):20s} {str(r['blocks']) + ' ' + '/'.join(r['kind']):27s}"
    )
    if "error" in r:
        return f"{head} {r['error']}"
    ratio = "-" if not r["dots"] else f"{r['mma_ratio_max']:.2f} (worst dot), {r['mma_ratio']:.2f} (all)"
    if r["unattributed"]:
        ratio = f"{r['unattributed']} MMA instructions with no dot site"
    ws = f"; {r['ws_partitions']} warp-specialised partitions" if r.get("ws_partitions") else ""
    return (
        f"{head} {r['registers']!s:>4s} {r['spill_bytes']!s:>5s} {r['shared_kib']:4.0f} "
        f"{'yes' if r['tma'] else 'no':3s} {'yes' if r['wgmma'] else 'no':5s} {ratio}{ws}"
    )


# ------------------------------------------------------------------------------------------------ output


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head_dims = sorted({r.Hd for r in rows if r.case == "dense"})
    fig, axes = plt.subplots(2, len(head_dims) + 1, figsize=(5 * (len(head_dims) + 1), 8), squeeze=False)
    for row_i, mode in enumerate(("fwd", "fwd+bwd")):
        for col, Hd in enumerate(head_dims):
            ax = axes[row_i][col]
            for provider in sorted({r.provider for r in rows if r.case == "dense"}):
                key = ("dense", provider, mode, Hd)
                pts = sorted((r.T, r.tflops) for r in rows if (r.case, r.provider, r.mode, r.Hd) == key)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_title(f"dense causal, Hd {Hd}, {mode}")
            ax.set_xlabel("T (tokens)")
            ax.set_ylabel("TFLOP/s")
            ax.legend()
        ax = axes[row_i][-1]
        others = [r for r in rows if r.case != "dense" and r.mode == mode]
        ax.barh([f"{r.case} {r.provider} K={r.K} T={r.T}" for r in others], [r.tflops for r in others])
        ax.set_title(f"GQA and packed, {mode}")
        ax.set_xlabel("TFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def environment(smoke: bool) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    import triton

    return {
        "device": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "smoke": smoke,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--tokens", type=int, default=16384, help="batch × T of every dense case")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also time (with --compile-only: build) alternative tile sizes (Hd 128, T 4096)",
    )
    parser.add_argument(
        "--sweep-only",
        action="store_true",
        help="only time the alternative tiles, writing DIR/attention_sweep.json after each one",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes only (forced without CUDA)")
    parser.add_argument("--rep-ms", type=int, default=100, help="milliseconds do_bench times each case (CUDA)")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="no GPU needed: build the kernels for sm_<arch>; report registers, spills, shared memory",
    )
    parser.add_argument("--arch", default="90", help="with --compile-only: compute capabilities, e.g. 90,80")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="with --compile-only: Llama-2 sizes whose heads are built (7b 32:32, 13b 40:40, 70b 64:8)",
    )
    args = parser.parse_args()
    global REP_MS
    REP_MS = args.rep_ms
    torch.manual_seed(0)

    if args.compile_only:
        archs = [int(x) for x in args.arch.split(",")]
        results = compile_report(archs, args.models.split(","), [int(x) for x in args.head_dims.split(",")], args.sweep)
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"environment": environment(False), "kernels": results}
        (args.out / "attention_compile.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out / 'attention_compile.json'}")
        failed = [r for r in results if "default" in r["kind"] and "error" in r]
        sys.exit(1 if failed else 0)

    smoke = args.smoke or not CUDA
    if not CUDA:
        print("no CUDA: smoke mode, tiny fp32 shapes under Triton's CPU interpreter; times are the interpreter's")
    if args.sweep_only:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "attention_sweep.json"
        if smoke:  # one candidate of each kernel at a tiny shape: the code path, not a measurement
            for name in SWEEP:
                SWEEP[name] = [(32, 16, 4, 1) if name != "_bwd_dkdv_blocks" else (16, 32, 4, 1)]
            sweep(64, 16, 2, 64, torch.float32, path, alpaca_like_rows(1, 64, 5, 30))
        else:
            sweep(4096, 128, 32, args.tokens, torch.bfloat16, path, alpaca_like_rows(4, 4096))
        print(f"wrote {path}")
        return
    if not smoke:
        dtype, H, tokens = torch.bfloat16, 32, args.tokens
        seqlens = [int(x) for x in args.seqlens.split(",")]
        head_dims = [int(x) for x in args.head_dims.split(",")]
        gqa_T, gqa, pack_T, pack_rows, doc_lengths = [4096, 8192], (32, 8), 4096, 4, (50, 1500)
    else:
        dtype, H, tokens = torch.float32, 4, 128
        seqlens, head_dims = [64], [16, 32]
        gqa_T, gqa, pack_T, pack_rows, doc_lengths = [64], (4, 2), 128, 1, (5, 60)
    print(HEADER)
    global PARTIAL
    args.out.mkdir(parents=True, exist_ok=True)
    PARTIAL = args.out / "attention.json"
    rows: list[Row] = []
    run_dense(seqlens, head_dims, H, tokens, dtype, rows)
    gqa_hd = max(head_dims)
    for T in gqa_T:
        B = max(1, tokens // T)
        for n_heads, n_kv in ((gqa[0], gqa[0]), gqa):
            run_case("gqa", B, T, n_heads, n_kv, gqa_hd, dtype, None, rows)
    packing = alpaca_like_rows(pack_rows, pack_T, *doc_lengths)
    run_case("packed", pack_rows, pack_T, H, H, gqa_hd, dtype, packing, rows)
    if not any((r.case, r.B, r.T, r.Hd) == ("dense", pack_rows, pack_T, gqa_hd) for r in rows):
        run_case("dense", pack_rows, pack_T, H, H, gqa_hd, dtype, None, rows)  # the packed case's yardstick

    summary = {}
    for mode in ("fwd", "fwd+bwd"):
        rate = {(r.case, r.B, r.T, r.K, r.Hd): r.tflops for r in rows if r.provider == "c2a" and r.mode == mode}
        dense = rate.get(("dense", pack_rows, pack_T, H, gqa_hd))
        packed = rate.get(("packed", pack_rows, pack_T, H, gqa_hd))
        if dense and packed:
            summary[f"c2a packed / dense, {mode}"] = packed / dense
        for T in gqa_T:
            B = max(1, tokens // T)
            grouped, full = rate.get(("gqa", B, T, gqa[1], gqa_hd)), rate.get(("gqa", B, T, gqa[0], gqa_hd))
            if grouped and full:
                summary[f"c2a GQA {gqa[0]}:{gqa[1]} / MHA, T={T}, {mode}"] = grouped / full
    # the atomic dQ backward (default) against the deterministic separate dQ pass, same shapes
    atomic = {(r.case, r.B, r.T, r.K, r.Hd): r.tflops for r in rows if r.provider == "c2a" and r.mode == "fwd+bwd"}
    for r in rows:
        if r.provider == "c2a-deterministic" and (r.case, r.B, r.T, r.K, r.Hd) in atomic:
            summary[f"c2a atomic / deterministic backward, {r.case} T={r.T} K={r.K}, fwd+bwd"] = (
                atomic[(r.case, r.B, r.T, r.K, r.Hd)] / r.tflops
            )
    # each other forward kernel against the default one, same shapes and mode
    c2a_rate = {(r.case, r.B, r.T, r.K, r.Hd, r.mode): r.tflops for r in rows if r.provider == "c2a"}
    for r in rows:
        key = (r.case, r.B, r.T, r.K, r.Hd, r.mode)
        if r.provider in TMA_PROVIDERS and key in c2a_rate:
            summary[f"{r.provider} / c2a, {r.case} T={r.T} K={r.K} Hd={r.Hd}, {r.mode}"] = r.tflops / c2a_rate[key]
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")

    sweep_results = sweep(4096, 128, 32, args.tokens, dtype) if args.sweep and not smoke else []
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "environment": environment(smoke),
        "rows": [asdict(r) for r in rows],
        "summary": summary,
        "sweep": sweep_results,
    }
    (args.out / "attention.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / "attention.png")
    print(f"wrote {args.out / 'attention.json'} and {args.out / 'attention.png'}")


if __name__ == "__main__":
    main()
