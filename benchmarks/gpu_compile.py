"""Build Triton kernels for an NVIDIA GPU on a machine without one, and read what ptxas made of them.

Triton's real compiler (not its CPU interpreter) runs on any machine: `triton.compile` with a
`GPUTarget` lowers a kernel to PTX, and the ptxas that ships with Triton assembles it and reports, with
`-v`, the registers per thread and the bytes spilled to local memory. The interpreter accepts code that
this compiler rejects, so a kernel only ever run interpreted is first checked here.

`capture_launches` runs a launcher with its kernels replaced by recorders, so that what gets compiled is
exactly what the launcher would launch (its own block and warp choices); `compile_launch` specialises
those arguments with Triton's own launch-time rules (int → i32 or i64 by value, 16-divisibility of
pointers and ints) and compiles them. Both lean on Triton internals (the JIT's binder, ASTSource,
GPUTarget), as of Triton 3.9, and also run on Triton 3.6 (the lent GPU machines' version).
Imported by benchmarks/kernels.py and benchmarks/attention.py.

`mma_report` measures duplicated tensor-core work: issued tensor-core FLOPs ÷ useful FLOPs, per dot.
Triton compiles a kernel as SPMD code that every warp of a program runs, so a dot whose tile is smaller
than what the warps' layout covers is computed more than once (e.g. two warp groups each computing the
same 64-row tile). Method, per dot site (a `tl.dot` call's source line and column):
  useful = Σ over the dot's instances in the final TTGIR (after pipelining and inlining, so a helper
           inlined 3 times, or an iteration the pipeliner peeled, counts each copy) of 2·M·N·K;
  issued = Σ over the PTX tensor-core instructions whose `.loc` is that site of 2·m·n·k × issuers, where
           issuers = warps ÷ 4 for `wgmma.mma_async` (one instruction per warp group computes a whole
           m64nNk16) and warps for `mma.sync` (one per warp), warps being the program's num_warps (or its
           warp-specialisation partition's).
Both are static counts of the same code, one iteration of each loop body, so ratio = issued ÷ useful is
the work per tile iteration whatever the trip counts: 1.00 means no tensor-core work is duplicated. The
kernel's `mma_ratio_max` (worst site) bounds the run-time ratio whatever the loops' trip counts;
`mma_ratio` sums all sites. Every MMA instruction must land on a dot site (else `unattributed` > 0 and no
ratio is given), and the tensor-core FLOPs of the SASS (the bundled cuobjdump; HGMMA, HMMA) must equal the
PTX's (`sass_check`), i.e. ptxas neither dropped nor added MMAs. tests/test_compile_for_gpu.py checks the
method on one-dot kernels whose answer is known: a tile the warps divide evenly gives 1.00, and 8 warps on a
16×16 tile must give ≥ 4 (each warp issues at least one m16n8k16, 4× the tile's 2·16·16·16 FLOPs).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


def gpu_name(arch: int) -> str:
    """ptxas's name for compute capability `arch`: 90 -> sm_90a (wgmma, as Triton builds for Hopper)."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def ptxas_stats(ptx: str, arch: int) -> dict[str, int | None]:
    """Assembles PTX with Triton's bundled ptxas -v -> registers per thread and spill-store bytes."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name(arch)}", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu_name(arch)}: {done.stderr.strip()[:300]}")
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
    }


@dataclass
class Launch:
    """One recorded launch: kernel[grid](*args, **kwargs), args as the launcher passed them."""

    kernel: Any  # triton.runtime.jit.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)


class _Recorder:
    def __init__(self, kernel: Any, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, grid, args, kwargs))


@contextmanager
def capture_launches(*modules: ModuleType) -> Iterator[list[Launch]]:
    """Within the block, every @triton.jit kernel that these modules launch is recorded, not run.

    The launchers look their kernels up as module globals at call time, so swapping the globals is
    enough; the kernels are put back on exit, before anything is compiled (a kernel's body resolves the
    jit helpers it calls through the same globals). Run the launchers on meta tensors: they allocate and
    do their torch ops without data, and a meta tensor's data_ptr() is its byte offset, so pointer
    alignment specialises as it would on a CUDA allocation (at least 256-byte aligned) viewed the same way.
    """
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    saved = []
    for module in modules:
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction):
                saved.append((module, name, obj))
    try:
        for module, name, obj in saved:
            setattr(module, name, _Recorder(obj, launches))
        yield launches
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


def specialise(launch: Launch, arch: int) -> tuple[dict, dict, dict, Any]:
    """The launch's (signature, constexprs, attrs, options) as Triton's JIT would derive them on a CUDA
    device of compute capability `arch` (the same binder and packing code as JITFunction.run)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs)
    # the options JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.9; 3.6 (the lent GPUs) has none
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, arch: int) -> dict[str, Any]:
    """Compiles a recorded launch for sm_<arch> -> registers, spill_bytes, shared_kib, and the tensor-core
    report of `mma_report` (tma, wgmma, mma_ratio, ...), or raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialise(launch, arch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    return {
        **ptxas_stats(compiled.asm["ptx"], arch),
        "shared_kib": compiled.metadata.shared / 1024,
        **mma_report(compiled.asm, arch),
    }


# ------------------------------------------------------------------------------------------------ tensor cores

# One tensor-core instruction in PTX: wgmma (sm_90, issued by a warp group of 4 warps, M = 64) or mma.sync
# (sm_80 and later, issued by one warp), with its m, n, k.
_PTX_MMA = re.compile(r"\b(wgmma\.mma_async\.sync|mma\.sync)\.aligned\.m(\d+)n(\d+)k(\d+)")
# The same in SASS (cuobjdump): HGMMA.64x16x16 is m64n16k16; HMMA.16816 is m16n8k16, HMMA.1688 m16n8k8.
_SASS_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_SASS_HMMA = re.compile(r"\bHMMA\.(16)(8)(16|8)\b")
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"(?:,\s*"([^"]*)")?')
# A dot in the final TTGIR: tt.dot (mma.sync layouts) or ttng.warp_group_dot (wgmma); operand types give
# A [.., M, K] and the result [.., M, N].
_TTGIR_DOT = re.compile(
    r"= (tt\.dot|ttng\.warp_group_dot) .* : (?:!ttg\.memdesc|tensor)<((?:\d+x)+)\w+.*-> tensor<((?:\d+x)+)\w+"
)
_TTGIR_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_TTGIR_PARTITION = re.compile(r"\bpartition\d+\(.*\bnum_warps\((\d+)\)")


def _resolve_loc(body: str, defs: dict[str, str], depth: int = 0) -> tuple[str, int, int] | None:
    """An MLIR location -> (file name, line, column) of the innermost source position, or None."""
    body = body.strip()
    if depth > 64:
        return None
    if body.startswith("#loc"):
        return _resolve_loc(defs[body], defs, depth + 1) if body in defs else None
    if m := re.fullmatch(r'"([^"]*)":(\d+):(\d+)(?:\s+to\s+.*)?', body):  # "file":line:col
        return os.path.basename(m.group(1)), int(m.group(2)), int(m.group(3))
    if m := re.fullmatch(r'"[^"]*"\((.*)\)', body):  # a named location: "p_t"(#loc88)
        return _resolve_loc(m.group(1), defs, depth + 1)
    if m := re.fullmatch(r"callsite\((\S+) at .*\)", body):  # inlined: the callee's position
        return _resolve_loc(m.group(1), defs, depth + 1)
    if m := re.fullmatch(r"fused(?:<[^>]*>)?\[([^,\]]+).*\]", body):
        return _resolve_loc(m.group(1), defs, depth + 1)
    return None


def ttgir_dots(ttgir: str) -> list[dict[str, Any]]:
    """Every dot of the final TTGIR (after pipelining, so an instance the compiler peeled counts): its
    source site (file, line, column), M, N, K, and the warps that run it (the kernel's num_warps, or
    its warp-specialisation partition's)."""
    defs = {}
    for line in ttgir.splitlines():
        if m := _TTGIR_LOC_DEF.match(line):
            defs[m.group(1)] = m.group(2)
    module_warps = re.search(r'"ttg\.num-warps" = (\d+)', ttgir)
    warps_stack = [(0, int(module_warps.group(1)) if module_warps else 4)]
    depth, dots = 0, []
    for line in ttgir.splitlines():
        if m := _TTGIR_PARTITION.search(line):  # a warp_specialize partition region opens on this line
            warps_stack.append((depth, int(m.group(1))))
        if m := _TTGIR_DOT.search(line):
            a, c = [int(x) for x in m.group(2)[:-1].split("x")], [int(x) for x in m.group(3)[:-1].split("x")]
            batch = math.prod(c[:-2])
            loc = re.search(r"loc\((.*)\)\s*$", line)
            dots.append(
                {
                    "site": _resolve_loc(loc.group(1), defs) if loc else None,
                    "M": c[-2],
                    "N": c[-1],
                    "K": a[-1],
                    "batch": batch,
                    "warps": warps_stack[-1][1],
                    "wgmma": m.group(1) == "ttng.warp_group_dot",
                }
            )
        depth += line.count("{") - line.count("}")
        while len(warps_stack) > 1 and depth <= warps_stack[-1][0]:
            warps_stack.pop()
    return dots


def ptx_mma(ptx: str) -> list[dict[str, Any]]:
    """Every tensor-core instruction of the PTX with its m, n, k, whether it is a wgmma, and the source
    site of the `.loc` before it (the innermost position, as in the TTGIR)."""
    files, site, found = {}, None, []
    for line in ptx.splitlines():
        if m := _PTX_FILE.match(line):
            files[m.group(1)] = os.path.basename(m.group(3) or m.group(2))
        elif m := _PTX_LOC.match(line):
            site = (files.get(m.group(1), m.group(1)), int(m.group(2)), int(m.group(3)))
        elif m := _PTX_MMA.search(line):
            found.append(
                {
                    "wgmma": m.group(1).startswith("wgmma"),
                    "m": int(m.group(2)),
                    "n": int(m.group(3)),
                    "k": int(m.group(4)),
                    "site": site,
                }
            )
    for m in _PTX_FILE.finditer(ptx):  # .file directives may follow the code: re-resolve the file names
        files[m.group(1)] = os.path.basename(m.group(3) or m.group(2))
    for ins in found:
        if ins["site"] is not None and ins["site"][0].isdigit():
            ins["site"] = (files.get(ins["site"][0], ins["site"][0]),) + ins["site"][1:]
    return found


def sass_mma_flops(cubin: bytes, arch: int) -> int | None:
    """Tensor-core FLOPs of one issue of every MMA instruction in the SASS (Triton's bundled cuobjdump),
    or None where the tool is missing: a check that ptxas kept the PTX's MMAs as they were."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(arch).path), "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    hgmma = sum(2 * int(m) * int(n) * int(k) for m, n, k in _SASS_HGMMA.findall(done.stdout))
    hmma = sum(2 * int(m) * int(n) * int(k) for m, n, k in _SASS_HMMA.findall(done.stdout))
    return hgmma + hmma


def mma_report(asm: dict[str, Any], arch: int) -> dict[str, Any]:
    """Tensor-core work issued by a compiled kernel against the work its dots ask for (see the module
    docstring for the method) -> tma, wgmma, mma (instruction counts by shape), dots (per source site:
    instances, M, N, K, issued and useful FLOPs, ratio), mma_ratio (all sites), mma_ratio_max (worst
    site), unattributed (MMA instructions with no dot site), sass_check (SASS FLOPs == PTX FLOPs), ws_partitions
    (warp-specialisation partitions in the final TTGIR)."""
    ptx = asm["ptx"]
    dots, instrs = ttgir_dots(asm["ttgir"]), ptx_mma(ptx)
    sites: dict[Any, dict[str, Any]] = {}
    for d in dots:
        s = sites.setdefault(
            d["site"],
            {
                "site": d["site"],
                "instances": 0,
                "M": d["M"],
                "N": d["N"],
                "K": d["K"],
                "useful_flops": 0,
                "issued_flops": 0,
                "warps": set(),
            },
        )
        s["instances"] += 1
        s["useful_flops"] += 2 * d["batch"] * d["M"] * d["N"] * d["K"]
        s["warps"].add(d["warps"])
    unattributed, issued_total, counts = 0, 0, {}
    for ins in instrs:
        shape = f"{'wgmma' if ins['wgmma'] else 'mma'}.m{ins['m']}n{ins['n']}k{ins['k']}"
        counts[shape] = counts.get(shape, 0) + 1
        site = sites.get(ins["site"])
        if site is None or len(site["warps"]) != 1:  # no dot at this site, or dots run by different warps
            unattributed += 1
            continue
        warps = next(iter(site["warps"]))
        # wgmma: one issue per warp group (4 warps), each computing a full m64nNk16; mma.sync: one per warp
        issuers = warps // 4 if ins["wgmma"] else warps
        flops = 2 * ins["m"] * ins["n"] * ins["k"] * issuers
        site["issued_flops"] += flops
        issued_total += flops
    rows = []
    for s in sites.values():
        s["warps"] = sorted(s["warps"])
        s["ratio"] = s["issued_flops"] / s["useful_flops"] if s["useful_flops"] else None
        s["site"] = list(s["site"]) if s["site"] else None
        rows.append(s)
    useful_total = sum(s["useful_flops"] for s in rows)
    sass = sass_mma_flops(asm["cubin"], arch) if "cubin" in asm else None
    ptx_once = sum(2 * i["m"] * i["n"] * i["k"] for i in instrs)  # one issue of each, as SASS is counted
    ratios = [s["ratio"] for s in rows if s["ratio"] is not None]
    return {
        "tma": "cp.async.bulk.tensor" in ptx,
        "wgmma": any(i["wgmma"] for i in instrs),
        "mma": counts,
        "dots": rows,
        "mma_ratio": issued_total / useful_total if useful_total and not unattributed else None,
        "mma_ratio_max": max(ratios) if ratios and not unattributed else None,
        "unattributed": unattributed,
        "sass_check": None if sass is None else sass == ptx_once,
        # partitions of `tl.range(..., warp_specialize=True)` loops that Triton did split (0: none split)
        "ws_partitions": len(_TTGIR_PARTITION.findall(asm["ttgir"])),
    }
