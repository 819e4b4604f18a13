"""Build Triton kernels for an NVIDIA GPU on a machine without one, and read what ptxas made of them.

Triton's real compiler (not its CPU interpreter) runs on any machine: `triton.compile` with a
`GPUTarget` lowers a kernel to PTX, and the ptxas that ships with Triton assembles it and reports, with
`-v`, the registers per thread and the bytes spilled to local memory. The interpreter accepts code that
this compiler rejects, so a kernel only ever run interpreted is first checked here.

`capture_launches` runs a launcher with its kernels replaced by recorders, so that what gets compiled is
exactly what the launcher would launch (its own block and warp choices); `compile_launch` specialises
those arguments with Triton's own launch-time rules (int → i32 or i64 by value, 16-divisibility of
pointers and ints) and compiles them. Both lean on Triton internals (the JIT's binder, ASTSource,
GPUTarget), as of Triton 3.9. Imported by benchmarks/kernels.py and benchmarks/attention.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator


def gpu_name(arch: int) -> str:
    """ptxas's name for compute capability `arch`: 90 -> sm_90a (wgmma, as Triton builds for Hopper)."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def ptxas_stats(ptx: str, arch: int) -> dict[str, int | None]:
    """Assembles PTX with Triton's bundled ptxas -v -> registers per thread and spill-store bytes."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name(arch)}", f.name, "-o", os.devnull],
                              capture_output=True, text=True)  # fmt: skip
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
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, arch: int) -> dict[str, Any]:
    """Compiles a recorded launch for sm_<arch> -> registers, spill_bytes, shared_kib (or raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialise(launch, arch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    return {**ptxas_stats(compiled.asm["ptx"], arch), "shared_kib": compiled.metadata.shared / 1024}
