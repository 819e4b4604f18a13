"""c2a's Triton kernels (RMSNorm, fused residual-add RMSNorm, rotary, SwiGLU, fused linear cross-entropy)
against the torch reference in eager mode, torch.compile of that reference, torch's chunked linear
cross-entropy and Liger-Kernel (where installed), forward and forward + backward.

    python benchmarks/kernels.py [--out DIR] [--kernels rmsnorm,rotary,...] [--tokens 4096,16384] [--no-compile]

Shapes: Llama-2 7B (D 4096, 32 heads of 128, FFN 11008) and 13B (D 5120, 40 heads, FFN 13824) at 4k and
16k tokens, vocabulary 32000, bf16. Reported per row: the median time (triton.testing.do_bench), the
effective bandwidth of the memory-bound kernels (each input read once and each output written once, as
the op defines them, whatever a provider actually moves) and its share of this card's copy bandwidth
(a device-to-device copy measured here), TFLOP/s of the loss (2·N·D·V forward, 6·N·D·V forward + backward),
the loss's peak memory above its inputs (torch.cuda.max_memory_allocated), and each provider's largest
forward difference against the eager reference on the same inputs.

Without CUDA it says so and runs a smoke mode (`--smoke` asks for it on a GPU too): tiny shapes under
Triton's CPU interpreter, wall-clock times of the interpreter (not of any kernel), no torch.compile.
Writes DIR/kernels.json and DIR/kernels.png; prints a table; never asserts a time.

    python benchmarks/kernels.py --compile-only [--arch 90,80] [--dtypes bf16,fp16,fp32] [--models 7b,13b]

needs no GPU: it builds every kernel for CUDA sm_<arch> (90 means sm_90a) with Triton's real compiler
and the ptxas bundled with Triton, which reject code that the CPU interpreter accepts. The launchers run on
meta tensors at the shapes above with their kernels recorded rather than launched, so each kernel is
compiled with exactly the arguments, block sizes and warps its launcher would use on that card (see
benchmarks/gpu_compile.py). Prints registers per thread, spill bytes and shared memory per kernel (or the
compile error), writes DIR/kernels_compile.json (which also holds gpu_compile's tensor-core report: these
kernels have no dots, and none uses TMA), and exits 1 if any kernel failed to compile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
COMPILE_ONLY = "--compile-only" in sys.argv  # builds for a GPU target: Triton's real compiler, never the interpreter
if COMPILE_ONLY:
    os.environ.pop("TRITON_INTERPRET", None)  # an interpreted kernel cannot be compiled (tests' conftest sets it)
elif not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: it reads this at decoration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing
import triton  # noqa: E402

from c2a.kernels import cross_entropy, rmsnorm, rotary  # noqa: E402
from c2a.kernels import swiglu as swiglu_module  # noqa: E402
from c2a.kernels.cross_entropy import (  # noqa: E402
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)
from c2a.kernels.rmsnorm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference  # noqa: E402
from c2a.kernels.rotary import apply_rotary, rotary_angles, rotary_reference  # noqa: E402
from c2a.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
EPS, THETA = 1e-5, 10000.0
KERNELS = ("rmsnorm", "add_rmsnorm", "rotary", "swiglu", "cross_entropy")
MODELS = {"7b": dict(D=4096, H=32, F=11008), "13b": dict(D=5120, H=40, F=13824)}


@dataclass
class Row:
    kernel: str
    shape: str
    mode: str  # fwd | fwd+bwd
    provider: str
    ms: float | None = None
    gbps: float | None = None  # memory-bound kernels
    copy_pct: float | None = None  # gbps as a share of the measured copy bandwidth
    tflops: float | None = None  # the loss
    peak_mb: float | None = None  # the loss, CUDA only
    max_diff: float | None = None  # forward output against the eager reference
    note: str = ""


# ------------------------------------------------------------------------------------------------ timing


# milliseconds do_bench spends timing each case (its default 100): --rep-ms (gpu_check uses 40)
REP_MS = 100


def bench_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds per call: do_bench on CUDA (leaf grads reset between calls, so gradient
    accumulation is not timed); a wall clock over 3 calls under the interpreter."""
    fn()  # warm-up: Triton's JIT, torch.compile's compilation, the allocator's caches
    if CUDA:
        return triton.testing.do_bench(fn, rep=REP_MS, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def peak_mb(fn: Callable[[], object]) -> float | None:
    """Peak device memory of one call above what was allocated before it, in MiB (CUDA only)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbps() -> float | None:
    """The card's device-to-device copy bandwidth (GB/s, read + write), the ceiling for memory-bound ops."""
    if not CUDA:
        return None
    x = torch.empty(2**28, dtype=torch.bfloat16, device=DEVICE)  # 512 MiB: far beyond L2
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * x.element_size() / ms / 1e6


def run_backward(outs, grads) -> None:
    torch.autograd.backward(outs, grads)


# ------------------------------------------------------------------------------------------------ cases
# Each case: leaves (tensors that take gradients), a forward per provider, the upstream gradients, and the
# bytes or FLOPs of one forward and of one forward + backward.


@dataclass
class Case:
    kernel: str
    shape: str
    leaves: list[torch.Tensor]
    providers: dict[str, Callable]  # name -> fn(*leaves) -> output or tuple of outputs
    grads: tuple[torch.Tensor, ...]
    fwd_bytes: int = 0
    fwdbwd_bytes: int = 0
    fwd_flops: int = 0
    fwdbwd_flops: int = 0
    notes: dict[str, str] | None = None


def _liger():
    try:
        import liger_kernel.transformers as lt
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return lt, LigerSiLUMulFunction
    except ImportError:
        return None, None


def maybe_compile(fn: Callable, use_compile: bool) -> dict[str, Callable]:
    return {"torch.compile": torch.compile(fn)} if use_compile else {}


def make_cases(kernels: list[str], tokens: list[int], smoke: bool, use_compile: bool, dtype: torch.dtype) -> list[Case]:
    liger, liger_silu_mul = _liger() if CUDA else (None, None)
    models = {"tiny": dict(D=80, H=4, F=136)} if smoke else MODELS
    vocab = 1000 if smoke else 32000
    cases = []
    for model, m in models.items():
        D, H, F = m["D"], m["H"], m["F"]
        Hd = D // H
        for N in tokens:
            shape = f"{model} N={N}"
            s = torch.finfo(dtype).bits // 8

            def randn(*size, scale=1.0):
                return (torch.randn(*size, device=DEVICE) * scale).to(dtype).requires_grad_()

            if "rmsnorm" in kernels:
                x, w = randn(N, D), randn(D, scale=0.1)
                with torch.no_grad():
                    w.add_(1)
                providers = {
                    "c2a": lambda x, w: rms_norm(x, w, EPS),
                    "torch": lambda x, w: rms_norm_reference(x, w, EPS),
                }
                providers |= maybe_compile(lambda x, w: rms_norm_reference(x, w, EPS), use_compile)
                if liger:
                    norm = liger.LigerRMSNorm(D, eps=EPS).to(DEVICE, dtype)
                    providers["liger"] = lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,))
                cases.append(
                    Case(
                        "rmsnorm",
                        f"{shape} D={D}",
                        [x, w],
                        providers,
                        (torch.randn_like(x),),
                        fwd_bytes=(2 * N * D + D) * s,
                        fwdbwd_bytes=(5 * N * D + 3 * D) * s,
                    )
                )
            if "add_rmsnorm" in kernels:
                x, r, w = randn(N, D), randn(N, D), randn(D, scale=0.1)
                providers = {
                    "c2a": lambda x, r, w: add_rms_norm(x, r, w, EPS),
                    "torch": lambda x, r, w: add_rms_norm_reference(x, r, w, EPS),
                }
                providers |= maybe_compile(lambda x, r, w: add_rms_norm_reference(x, r, w, EPS), use_compile)
                # forward reads x, r, w, writes h, y; backward reads dh, dy, h, w, writes dx (= dr), dw
                cases.append(
                    Case(
                        "add_rmsnorm",
                        f"{shape} D={D}",
                        [x, r, w],
                        providers,
                        (torch.randn_like(x), torch.randn_like(x)),
                        fwd_bytes=(4 * N * D + D) * s,
                        fwdbwd_bytes=(8 * N * D + 3 * D) * s,
                    )
                )
            if "rotary" in kernels:
                T = min(N, 4096)
                B = N // T
                q, k = randn(B, T, H, Hd), randn(B, T, H, Hd)
                pos = torch.arange(T, device=DEVICE).expand(B, T)
                providers = {
                    "c2a": lambda q, k: apply_rotary(q, k, pos, THETA),
                    "torch": lambda q, k: rotary_reference(q, k, pos, THETA),
                }
                providers |= maybe_compile(lambda q, k: rotary_reference(q, k, pos, THETA), use_compile)
                notes = {}
                if liger:
                    # Liger rotates HF's rotate-half layout on [B, H, T, Hd]: the same bytes and FLOPs
                    cos, sin = (torch.cat([t, t], dim=-1).to(dtype) for t in rotary_angles(pos, Hd, THETA))
                    providers["liger"] = lambda q, k: liger.liger_rotary_pos_emb(
                        q.transpose(1, 2), k.transpose(1, 2), cos, sin
                    )
                    notes["liger"] = "HF rotate-half layout, [B,H,T,Hd] views"
                qk = 2 * q.numel() * s
                cases.append(
                    Case(
                        "rotary",
                        f"{shape} H={H} Hd={Hd}",
                        [q, k],
                        providers,
                        (torch.randn_like(q), torch.randn_like(k)),
                        fwd_bytes=2 * qk,
                        fwdbwd_bytes=4 * qk,
                        notes=notes,
                    )
                )
            if "swiglu" in kernels:
                a, b = randn(N, F, scale=2.0), randn(N, F)
                providers = {"c2a": swiglu, "torch": swiglu_reference} | maybe_compile(swiglu_reference, use_compile)
                if liger_silu_mul:
                    providers["liger"] = liger_silu_mul.apply
                cases.append(
                    Case(
                        "swiglu",
                        f"{shape} F={F}",
                        [a, b],
                        providers,
                        (torch.randn_like(a),),
                        fwd_bytes=3 * N * F * s,
                        fwdbwd_bytes=8 * N * F * s,
                    )
                )
            if "cross_entropy" in kernels:
                h, W = randn(N, D), randn(vocab, D, scale=D**-0.5)
                labels = torch.randint(0, vocab, (N,), device=DEVICE)
                labels[torch.rand(N, device=DEVICE) < 0.3] = -100  # prompts are not trained on
                providers = {
                    "c2a": lambda h, W: linear_cross_entropy(h, W, labels),
                    "torch": lambda h, W: linear_cross_entropy_reference(h, W, labels),
                    "torch-chunked": lambda h, W: linear_cross_entropy_chunked(h, W, labels),
                }
                providers |= maybe_compile(lambda h, W: linear_cross_entropy_reference(h, W, labels), use_compile)
                if liger:
                    flce = liger.LigerFusedLinearCrossEntropyLoss()
                    providers["liger"] = lambda h, W: flce(W, h, labels)
                cases.append(
                    Case(
                        "cross_entropy",
                        f"{shape} D={D} V={vocab}",
                        [h, W],
                        providers,
                        (),
                        fwd_flops=2 * N * D * vocab,
                        fwdbwd_flops=6 * N * D * vocab,
                    )
                )
    return cases


def max_diff(out, ref) -> float:
    outs, refs = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
    return max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, refs))


def run_case(case: Case, copy_gbps: float | None) -> list[Row]:
    rows = []
    with torch.no_grad():
        reference = case.providers["torch"](*case.leaves)
    for provider, fn in case.providers.items():
        note = (case.notes or {}).get(provider, "")
        try:
            with torch.no_grad():  # forward only: no autograd state, and the loss computes no gradients
                out = fn(*case.leaves)
                diff = None if "layout" in note else max_diff(out, reference)
                fwd_ms = bench_ms(lambda: fn(*case.leaves))

            def fwd_bwd():
                out = fn(*case.leaves)
                if case.grads:
                    run_backward(out, case.grads)
                else:
                    out.backward()

            fwdbwd_ms = bench_ms(fwd_bwd, grad_to_none=case.leaves)
            mem = peak_mb(fwd_bwd) if case.kernel == "cross_entropy" else None
        except Exception as err:  # a baseline that cannot run here is reported, not fatal
            rows.append(Row(case.kernel, case.shape, "fwd", provider, note=f"error: {type(err).__name__}: {err}"[:160]))
            continue
        finally:
            for leaf in case.leaves:
                leaf.grad = None
        for mode, ms, nbytes, flops in (
            ("fwd", fwd_ms, case.fwd_bytes, case.fwd_flops),
            ("fwd+bwd", fwdbwd_ms, case.fwdbwd_bytes, case.fwdbwd_flops),
        ):
            gbps = nbytes / ms / 1e6 if nbytes else None
            rows.append(
                Row(
                    case.kernel,
                    case.shape,
                    mode,
                    provider,
                    ms=ms,
                    gbps=gbps,
                    copy_pct=100 * gbps / copy_gbps if gbps and copy_gbps else None,
                    tflops=flops / ms / 1e9 if flops else None,
                    peak_mb=mem if mode == "fwd+bwd" else None,
                    max_diff=diff if mode == "fwd" else None,
                    note=note,
                )
            )
    return rows


# ------------------------------------------------------------------------------------------------ compile only

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# SMs of the card each compute capability stands for (H100 SXM, A100): the RMSNorm backward's launcher sizes
# its grid by them, and its rows_per_program argument (so its specialisation) follows from the grid.
SM_COUNT = {90: 132, 80: 108}


def record_launches(kernel: str, model: dict[str, int], tokens: int, dtype: torch.dtype, arch: int) -> list:
    """The kernel launches of `kernel`'s public function, forward then backward (the loss: with gradients,
    then on inputs that need none, as in evaluation), on meta tensors of this model's shapes: nothing is
    computed."""
    from benchmarks.gpu_compile import capture_launches

    D, H, F, N = model["D"], model["H"], model["F"], tokens
    meta = torch.device("meta")

    def leaf(*size):
        return torch.empty(*size, device=meta, dtype=dtype, requires_grad=True)

    bwd_programs, sm_count = rmsnorm._bwd_programs, rmsnorm._sm_count
    # the RMSNorm backward asks the CUDA device for its SM count: answer for the card being compiled for
    rmsnorm._bwd_programs = lambda n_rows, device: bwd_programs(n_rows, torch.device("cuda", 0))
    rmsnorm._sm_count = lambda device_index: SM_COUNT[arch]
    try:
        with capture_launches(rmsnorm, rotary, swiglu_module, cross_entropy) as launches:
            if kernel == "rmsnorm":
                x, w = leaf(N, D), leaf(D)
                y = rms_norm(x, w, EPS)
                y.backward(torch.empty_like(y))
            elif kernel == "add_rmsnorm":
                x, r, w = leaf(N, D), leaf(N, D), leaf(D)
                h, y = add_rms_norm(x, r, w, EPS)
                torch.autograd.backward((h, y), (torch.empty_like(h), torch.empty_like(y)))
            elif kernel == "rotary":
                T = min(N, 4096)
                q, k = leaf(N // T, T, H, D // H), leaf(N // T, T, H, D // H)
                pos = torch.empty(N // T, T, dtype=torch.int64, device=meta)  # packed rows: explicit positions
                q_out, k_out = apply_rotary(q, k, pos, THETA)
                torch.autograd.backward((q_out, k_out), (torch.empty_like(q_out), torch.empty_like(k_out)))
            elif kernel == "swiglu":
                a, b = leaf(N, F), leaf(N, F)
                y = swiglu(a, b)
                y.backward(torch.empty_like(y))
            elif kernel == "cross_entropy":
                h, W = leaf(N, D), leaf(32000, D)
                labels = torch.empty(N, dtype=torch.int64, device=meta)
                linear_cross_entropy(h, W, labels).backward()
                linear_cross_entropy(h.detach(), W.detach(), labels)
                weights = torch.empty(N, dtype=torch.float32, device=meta)  # train.loss_weighting = "example"
                linear_cross_entropy(h, W, labels, weights=weights).backward()
    finally:
        rmsnorm._bwd_programs, rmsnorm._sm_count = bwd_programs, sm_count
    return launches


def compile_report(
    archs: list[int], kernels: list[str], models: list[str], dtypes: list[str], tokens: int
) -> list[dict]:
    """Compiles every launch of every kernel for each arch -> one row per distinct specialisation (models
    that launch the kernel identically share a row): registers, spill bytes, shared KiB, or the error."""
    from benchmarks.gpu_compile import compile_launch, specialise

    results = []
    print(
        f"{'arch':<8}{'kernel':<28}{'dtypes':<15}{'models':<8}{'regs':>5}{'spill B':>8}{'smem KiB':>9}"
        f"{'CTAs/SM':>8}  constexprs"
    )
    for arch in archs:
        seen: dict[tuple, dict] = {}
        for kernel in kernels:
            for dtype_name in dtypes:
                for model in models:
                    for launch in record_launches(kernel, MODELS[model], tokens, DTYPES[dtype_name], arch):
                        signature, constexprs, attrs, options = specialise(launch, arch)
                        names = launch.kernel.arg_names
                        consts = {names[path[0]]: value for path, value in constexprs.items()}
                        consts |= {"num_warps": options.num_warps, "num_stages": options.num_stages}
                        key = (launch.kernel.fn.__name__, repr(signature), repr(consts), repr(attrs))
                        if key in seen:  # the loss's chunks; a launch the same for 7b and 13b, or for every dtype
                            for field, value in (("models", model), ("dtypes", dtype_name)):
                                if value not in seen[key][field]:
                                    seen[key][field].append(value)
                            continue
                        row = {
                            "arch": arch,
                            "op": kernel,
                            "kernel": launch.kernel.fn.__name__,
                            "dtypes": [dtype_name],
                            "models": [model],
                            "constexprs": consts,
                            "signature": signature,
                            "divisible_by_16": [names[path[0]] for path, a in attrs.items() if a],
                        }
                        try:
                            row |= compile_launch(launch, arch)
                            row["ctas_per_sm"] = resident_ctas(
                                arch, row["registers"], options.num_warps, row["shared_kib"]
                            )
                        except Exception as err:  # report the compiler's message and go on to the others
                            row["error"] = f"{type(err).__name__}: {err}"
                        seen[key] = row
                        results.append(row)
        for row in seen.values():
            print(compile_row(row), flush=True)
    return results


def resident_ctas(arch: int, registers: int | None, num_warps: int, shared_kib: float) -> int | None:
    """Programs (CTAs) of this kernel that fit on one SM at once, by registers, warps and shared memory:
    the launchers reason in programs per SM. Limits of sm_80 and sm_90 (CUDA C++ Programming Guide,
    compute capabilities table): 64K 32-bit registers, at most 64 warps and 32 CTAs per SM; registers are
    allocated per warp in units of 256; shared memory per SM 164 KiB (sm_80) or 228 KiB (sm_90), of which
    1 KiB is reserved per CTA."""
    if registers is None:
        return None
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = 65536 // per_warp // num_warps
    smem = {80: 164, 90: 228}[arch]
    by_shared = int(smem // (shared_kib + 1)) if shared_kib else 32
    return min(by_registers, 64 // num_warps, by_shared, 32)


def compile_row(row: dict) -> str:
    shown = {k: v for k, v in row["constexprs"].items() if k != "num_stages"}
    consts = ", ".join(f"{k}={v}" for k, v in shown.items())
    head = f"sm_{row['arch']:<5}{row['kernel']:<28}{','.join(row['dtypes']):<15}{','.join(row['models']):<8}"
    if "error" in row:
        return head + f"{'ERROR':>30}  {consts}\n    " + row["error"].replace("\n", " ")[:400]
    return head + (
        f"{row['registers']!s:>5}{row['spill_bytes']!s:>8}{row['shared_kib']:9.1f}{row['ctas_per_sm']!s:>8}  {consts}"
    )


# ------------------------------------------------------------------------------------------------ output


def table(rows: list[Row]) -> str:
    def f(v, spec):
        width = int(spec.split(".")[0])
        return format(v, spec) if v is not None else "-".rjust(width)

    lines = [
        f"{'kernel':<14}{'shape':<26}{'mode':<9}{'provider':<15}{'ms':>9}{'GB/s':>8}{'%copy':>7}"
        f"{'TFLOP/s':>9}{'peak MiB':>10}{'max diff':>10}  note"
    ]
    for r in rows:
        lines.append(
            f"{r.kernel:<14}{r.shape:<26}{r.mode:<9}{r.provider:<15}{f(r.ms, '9.3f')}{f(r.gbps, '8.0f')}"
            f"{f(r.copy_pct, '7.0f')}{f(r.tflops, '9.1f')}{f(r.peak_mb, '10.0f')}{f(r.max_diff, '10.2e')}  {r.note}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, smoke: bool, copy_gbps: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, "gbps", "GB/s") for k in KERNELS[:4]]
    panels += [("cross_entropy", "ms", "ms"), ("cross_entropy", "peak_mb", "peak MiB")]
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    for ax, (kernel, field, label) in zip(axes.flat, panels):
        mine = [r for r in rows if r.kernel == kernel and getattr(r, field) is not None]
        ax.set_title(f"{kernel}: {label}" + (" (interpreter smoke run)" if smoke else ""))
        if not mine:
            ax.text(0.5, 0.5, "not measured here", ha="center", va="center", transform=ax.transAxes)
            continue
        groups = list(dict.fromkeys(f"{r.shape}\n{r.mode}" for r in mine))
        providers = list(dict.fromkeys(r.provider for r in mine))
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            values = {f"{r.shape}\n{r.mode}": getattr(r, field) for r in mine if r.provider == p}
            xs = [g + i * width for g, name in enumerate(groups) if name in values]
            ax.bar(xs, [values[name] for name in groups if name in values], width, label=p)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=6, rotation=30)
        if field == "gbps" and copy_gbps:
            ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label="copy bandwidth")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment(smoke: bool, copy_gbps: float | None) -> dict:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "device": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "smoke": smoke,
        "copy_gbps": copy_gbps,
    }


def sweep_rmsnorm_backward(tokens: int, dim: int, dtype: torch.dtype) -> list[dict]:
    """The RMSNorm backward's launch settings, timed as forward + backward (the backward runs at about a
    third of the copy bandwidth on an H200): programs per SM (`_bwd_programs`, each walking its rows in turn)
    and warps per program (`_settings`, the forward keeps its own), everything else at its default."""
    x = torch.randn(tokens, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(dim, device=DEVICE, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    programs, settings = rmsnorm._bwd_programs, rmsnorm._settings
    results = []
    sms = rmsnorm._sm_count(0) if CUDA else 1
    for per_sm in (2, 4, 8, 16):
        for warps in (4, 8, 16):
            rmsnorm._bwd_programs = lambda n_rows, device, k=per_sm: max(1, min(n_rows, k * sms))
            try:

                def fwd_bwd():
                    # the forward with its own settings, the backward's launch with these warps
                    out = rms_norm(x, w, 1e-5)
                    rmsnorm._settings = lambda n_cols, k=warps: (settings(n_cols)[0], k)
                    try:
                        out.backward(dy)
                    finally:
                        rmsnorm._settings = settings

                ms = bench_ms(fwd_bwd, [x, w])
            finally:
                rmsnorm._bwd_programs = programs
            results.append(
                {
                    "programs_per_sm": per_sm,
                    "warps": warps,
                    "ms": ms,
                    "default": (per_sm, warps) == (4, settings(dim)[1]),
                }
            )
            print(
                f"rmsnorm backward sweep: {per_sm:2d} programs/SM, {warps:2d} warps: {ms:.3f} ms fwd+bwd"
                f"{' (default)' if results[-1]['default'] else ''}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--tokens", default="4096,16384", help="tokens per case (comma-separated)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes only (forced without CUDA)")
    parser.add_argument("--rep-ms", type=int, default=100, help="milliseconds do_bench times each case (CUDA)")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="no GPU needed: build every kernel for sm_<arch>; report registers, spills, shared memory",
    )
    parser.add_argument("--arch", default="90,80", help="with --compile-only: compute capabilities, e.g. 90,80")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="with --compile-only: input dtypes")
    parser.add_argument("--models", default=",".join(MODELS), help="with --compile-only: model shapes")
    parser.add_argument(
        "--sweep-rmsnorm",
        action="store_true",
        help="also time the RMSNorm backward's programs per SM and warps (7B width, the largest --tokens)",
    )
    args = parser.parse_args()
    global REP_MS
    REP_MS = args.rep_ms
    kernels = args.kernels.split(",")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        parser.error(f"unknown kernels {unknown}; valid: {', '.join(KERNELS)}")

    if args.compile_only:
        archs = [int(a) for a in args.arch.split(",")]
        for name, given, valid in (
            ("arch", archs, SM_COUNT),
            ("dtypes", args.dtypes.split(","), DTYPES),
            ("models", args.models.split(","), MODELS),
        ):
            if sorted(set(given) - set(valid)):
                parser.error(f"unknown {name} {sorted(set(given) - set(valid))}; valid: {', '.join(map(str, valid))}")
        tokens = max(int(t) for t in args.tokens.split(","))
        results = compile_report(archs, kernels, args.models.split(","), args.dtypes.split(","), tokens)
        failed = [r for r in results if "error" in r]
        spilled = [r for r in results if r.get("spill_bytes")]
        print(
            f"{len(results)} kernel builds, {len(failed)} failed, {len(spilled)} spilling "
            f"(max {max((r['spill_bytes'] for r in spilled), default=0)} bytes)"
        )
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"environment": environment(False, None) | {"tokens": tokens}, "kernels": results}
        (args.out / "kernels_compile.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.out / 'kernels_compile.json'}")
        sys.exit(1 if failed else 0)
    smoke = args.smoke or not CUDA
    if not CUDA:
        print("no CUDA: smoke mode, tiny shapes under Triton's CPU interpreter; times are the interpreter's")
    tokens = [48] if smoke else [int(t) for t in args.tokens.split(",")]
    dtype = torch.float32 if not CUDA else torch.bfloat16  # the interpreter has no bf16 arithmetic
    use_compile = CUDA and not args.no_compile  # compiling for CPU would take minutes and measure nothing
    torch.manual_seed(0)

    copy_gbps = copy_bandwidth_gbps()
    rows: list[Row] = []
    for case in make_cases(kernels, tokens, smoke, use_compile, dtype):
        rows.extend(run_case(case, copy_gbps))
        del case
        if CUDA:
            torch.cuda.empty_cache()
    if copy_gbps:
        print(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s")
    print(table(rows))

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(smoke, copy_gbps), "rows": [asdict(r) for r in rows]}
    if args.sweep_rmsnorm:
        result["rmsnorm_backward_sweep"] = sweep_rmsnorm_backward(max(tokens), 64 if smoke else 4096, dtype)
    (args.out / "kernels.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / "kernels.png", smoke, copy_gbps)
    print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.png'}")


if __name__ == "__main__":
    main()
