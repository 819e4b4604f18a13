"""NF4 dequantization (c2a/kernels/nf4.py): the Triton kernel against its torch reference, and bitsandbytes'
dequantize_4bit where installed (the `bitsandbytes` extra), on Llama-2-7B's weight shapes, to bf16.

    python benchmarks/nf4.py [--out DIR] [--shapes 4096x4096,11008x4096] [--repeat N]

Reported per shape and provider: the median time and the effective bandwidth, bytes read (0.5 a weight of
codes + the scales) plus bytes written (2 a weight of bf16) over the time: dequantization is memory-bound, so
GB/s against the card's copy bandwidth is its measure. Every provider's output is checked bit-equal to the
torch reference's first.

Without CUDA: the torch reference and bitsandbytes' CPU kernel are timed on the CPU, and Triton runs under
its interpreter (TRITON_INTERPRET=1) on a small shape only, to check the same bits come out; the
interpreter's time is numpy's, not a kernel's, and is not reported as a speed. Writes DIR/nf4.json; prints a
table; never asserts a time.

    python benchmarks/nf4.py --compile-only [--arch 90,80]

needs no GPU: builds the dequantize kernel for sm_<arch> (90: sm_90a) at 11008 x 4096 in bf16, fp16 and fp32
with Triton's real compiler (benchmarks/gpu_compile.py), prints registers and spills, exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--compile-only" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)  # the real compiler: the interpreter's kernels cannot be captured
elif __name__ == "__main__" and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton decorates the kernels

import torch

from c2a.kernels import nf4
from c2a.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference, quantize_nf4

SHAPES_7B = [(4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008)]
# Under the interpreter Triton runs on SmolLM2's 576 x 576 only (5,184 blocks): seconds, not minutes
INTERPRETED_SHAPE = (576, 576)
INTERPRETED_BLOCKS = 576 * 576 // 64


def median_seconds(fn, repeat: int, cuda: bool) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def providers(w: torch.Tensor, q, device: torch.device, interpret: bool) -> dict:
    parts = [t.to(device) for t in (q.codes, q.qabsmax, q.absmax2, q.offset)]
    out = {"torch": lambda: dequantize_nf4_reference(*parts, q.shape, torch.bfloat16)}
    if not interpret or q.codes.shape[0] <= INTERPRETED_BLOCKS:
        out["triton"] = lambda: dequantize_nf4(*parts, q.shape, torch.bfloat16)
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        return out
    if not interpret or device.type == "cpu":
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        out["bitsandbytes"] = lambda: bnb.dequantize_4bit(packed, state)
    return out


def bench(shape: tuple[int, int], device: torch.device, repeat: int, interpret: bool) -> list[dict]:
    w = (0.02 * torch.randn(shape, device=device)).bfloat16()
    q = quantize_nf4(w)
    n = shape[0] * shape[1]
    moved = n // 2 + q.qabsmax.numel() + 4 * q.absmax2.numel() + 2 * n  # codes + scales in, bf16 out
    ref = None
    rows = []
    for name, fn in providers(w, q, device, interpret).items():
        out = fn().reshape(shape)
        ref = out if ref is None else ref
        row = {"shape": f"{shape[0]}x{shape[1]}", "provider": name, "bit_equal": bool(torch.equal(out, ref))}
        if name == "triton" and interpret:
            row["note"] = "Triton interpreter (numpy on the CPU): correctness only, not a speed"
        else:
            s = median_seconds(fn, repeat, device.type == "cuda")
            row.update(ms=round(1e3 * s, 3), gb_per_s=round(moved / s / 1e9, 2))
        rows.append(row)
    return rows


def compile_only(archs: list[int]) -> int:
    """Each output dtype's launch at 11008 x 4096, recorded on meta tensors and compiled for each arch."""
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_compile import capture_launches, compile_launch

    meta = torch.device("meta")
    blocks = 11008 * 4096 // 64
    parts = (
        torch.empty(blocks, 32, dtype=torch.uint8, device=meta),
        torch.empty(blocks, dtype=torch.uint8, device=meta),
        torch.empty(-(-blocks // 256), device=meta),
        torch.empty((), device=meta),
    )
    nf4._TABLES[meta] = (torch.empty(16, device=meta), torch.empty(256, device=meta), torch.empty(256, 2, device=meta))
    failed = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        with capture_launches(nf4) as launches:
            dequantize_nf4(*parts, (11008, 4096), dtype)
        for arch in archs:
            try:
                r = compile_launch(launches[0], arch)
                print(f"sm_{arch} {dtype}: {r['registers']} registers, {r['spill_bytes']} spill bytes")
            except Exception as e:  # a compile error is the report
                failed += 1
                print(f"sm_{arch} {dtype}: FAILED {type(e).__name__}: {e}")
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--shapes", default="", help="OUTxIN,... (default: Llama-2-7B's projections)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--compile-only", action="store_true", help="build the kernel for --arch without a GPU")
    ap.add_argument("--arch", default="90,80", help="compute capabilities for --compile-only")
    args = ap.parse_args()
    if args.compile_only:
        sys.exit(compile_only([int(a) for a in args.arch.split(",")]))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s] or SHAPES_7B
    if interpret and INTERPRETED_SHAPE not in shapes:
        shapes = [INTERPRETED_SHAPE, *shapes]
    rows = []
    for shape in shapes:
        rows += bench(shape, device, args.repeat, interpret)
    machine = torch.cuda.get_device_name() if cuda else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    print(f"NF4 dequantization to bf16 on {machine} (torch {torch.__version__})")
    print(f"{'shape':>12} {'provider':>13} {'ms':>9} {'GB/s':>8}  bit-equal")
    for r in rows:
        timing = f"{r['ms']:9.3f} {r['gb_per_s']:8.2f}" if "ms" in r else f"{'-':>9} {'-':>8}"
        print(f"{r['shape']:>12} {r['provider']:>13} {timing}  {r['bit_equal']}  {r.get('note', '')}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "nf4.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
