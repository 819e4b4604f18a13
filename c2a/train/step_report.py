"""What one optimizer step does outside the matmuls, counted without a GPU.

`StepCounter` is a TorchDispatchMode: run one `train_step` inside it and every aten op the step dispatches
is counted, with the bytes it reads and writes, by family:

  matmul        mm, addmm, bmm, _scaled_mm, attention (SDPA and its kernels), the chunked linear cross-entropy
  fsdp copies   what FSDP2 copies, found by its record_function scopes ("FSDP::..."): the all-gather
                copy-in (with the fp32 -> compute-dtype cast) and copy-out, chunk_cat (the reduce-scatter's
                copy-in), the gradient's cast to the reduce dtype
  collectives   all-gather, reduce-scatter, all-reduce (c10d ops): the communication itself
  casts         the other dtype casts and copies (copy_, _to_copy, clone)
  optimizer     every op dispatched inside optimizer.step (AdamW's foreach kernels and their copies)
  elementwise   everything else that moves bytes (norms, activations, rotary, the fp32 gradient
                accumulation and division, inside FSDP2 or not, ...)

Views (ops whose output aliases an input) and allocations (empty) move nothing. Bytes are the sizes of
the tensors an op reads (its inputs; for a copy, the source only) and writes (its outputs and the inputs it
mutates): an op's traffic if nothing is cached, the number the memory-bound work scales with. A DTensor
counts its local shard. Triton launches are invisible to a dispatch mode (they are not aten ops): they are
counted with Triton's launch hook (`triton.knobs.runtime.launch_enter_hook`), by kernel name; the
interpreter (TRITON_INTERPRET=1) runs kernels without launching them, so on CPU that count is zero.

The numbers are device-agnostic: the same step on CPU and on a GPU dispatches the same ops over the same
bytes, so the step's overhead can be measured, cut and tested in CI.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

FAMILIES = ("matmul", "fsdp copies", "collectives", "casts", "optimizer", "elementwise")

_MATMUL = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "linear", "matmul", "convolution")
_MATMUL_PARTS = ("scaled_dot_product", "linear_cross_entropy", "_flash_attention", "_efficient_attention")
_FSDP = ("chunk_cat", "split_with_sizes_copy", "fsdp::")  # by name; FSDP2's foreach copy-out by its scope
_COPIES = ("copy", "copy_", "_to_copy", "clone", "_foreach_copy_", "contiguous", "to")
_ARITHMETIC = ("add", "add_", "div", "div_", "mul", "mul_", "sub", "sub_", "_foreach_add_", "_foreach_div_")
_ALLOCATIONS = ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_")


@dataclass
class FamilyCount:
    ops: int = 0
    read: int = 0  # bytes
    written: int = 0

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass
class StepReport:
    """One step's counts (this rank's), with the sizes to divide them by."""

    families: dict[str, FamilyCount] = field(default_factory=lambda: {f: FamilyCount() for f in FAMILIES})
    views: int = 0  # aliasing ops: counted, moving no bytes
    by_op: Counter = field(default_factory=Counter)  # op name -> calls
    bytes_by_op: Counter = field(default_factory=Counter)  # "family: op name" -> bytes read + written
    triton_launches: Counter = field(default_factory=Counter)  # kernel name -> launches
    parameters: int = 0  # the model's parameters (all ranks)
    trained_tokens: int = 0  # the step's trained targets (all ranks)
    world_size: int = 1

    @property
    def ops(self) -> int:
        return self.views + sum(f.ops for f in self.families.values())

    def overhead_bytes(self) -> int:
        """FSDP copies plus dtype casts: the bytes one cast per step and no copies in a group of one cut."""
        return self.families["fsdp copies"].bytes + self.families["casts"].bytes

    def as_dict(self) -> dict[str, Any]:
        # this rank's bytes per parameter of the model (as FSDP gathers every parameter on every rank) and per
        # trained token of its share of the step
        per_param = max(self.parameters, 1)
        tokens = max(self.trained_tokens, 1) / self.world_size
        return {
            "aten_ops": self.ops,
            "views": self.views,
            "triton_launches": sum(self.triton_launches.values()),
            "parameters": self.parameters,
            "trained_tokens": self.trained_tokens,
            "world_size": self.world_size,
            "overhead_bytes_per_param": self.overhead_bytes() / per_param,
            "families": {
                name: {
                    "ops": f.ops,
                    "read_bytes": f.read,
                    "written_bytes": f.written,
                    "bytes_per_param": f.bytes / per_param,
                    "bytes_per_trained_token": f.bytes / tokens,
                }
                for name, f in self.families.items()
            },
            "top_ops": dict(self.by_op.most_common(15)),
            "top_bytes": dict(self.bytes_by_op.most_common(20)),
            "top_triton": dict(self.triton_launches.most_common(10)),
        }

    def table(self) -> str:
        d = self.as_dict()
        lines = [
            f"step report (rank 0 of {self.world_size}): {d['aten_ops']:,} aten ops ({self.views:,} views), "
            f"{d['triton_launches']:,} Triton launches; FSDP copies + casts {d['overhead_bytes_per_param']:.1f} "
            "bytes/parameter",
            f"{'family':<12} {'ops':>7} {'read MB':>9} {'written MB':>10} {'B/param':>8} {'B/token':>9}",
        ]
        for name, f in d["families"].items():
            lines.append(
                f"{name:<12} {f['ops']:>7,} {f['read_bytes'] / 1e6:>9.1f} {f['written_bytes'] / 1e6:>10.1f} "
                f"{f['bytes_per_param']:>8.1f} {f['bytes_per_trained_token']:>9,.0f}"
            )
        return "\n".join(lines)


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank


def _nbytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = _local(t)
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _mutated(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensor arguments the op writes in place (its schema's `Tensor(a!)` arguments), and those of them
    that are `out=` arguments (written without being read)."""
    written, out = [], []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = _tensors(args[i] if i < len(args) else kwargs.get(a.name))
            written += value
            out += value if a.is_out else []
    return written, out


def family_of(name: str, args: tuple, out: list[torch.Tensor], scopes: list[str]) -> str:
    """The family of a non-view op outside optimizer.step, inside the record_function `scopes` open."""
    base = name.split("::")[-1].split(".")[0]
    if base in _MATMUL or any(part in base for part in _MATMUL_PARTS):
        return "matmul"
    if "c10d" in name or base.startswith(("all_gather", "reduce_scatter", "all_reduce", "broadcast")):
        return "collectives"
    # what FSDP2 copies itself (copy-in with the fp32 -> compute-dtype cast, copy-out, chunk_cat, the
    # gradient's cast to the reduce dtype) runs inside its "FSDP::..." scopes; its arithmetic there (the
    # gradient's accumulation and division) is elementwise work
    if any(k in name for k in _FSDP) or (any(s.startswith("FSDP::") for s in scopes) and base not in _ARITHMETIC):
        return "fsdp copies"
    if base in _COPIES:
        return "casts"
    return "elementwise"


class StepCounter(TorchDispatchMode):
    """Counts the aten ops (and Triton launches) dispatched while it is active; `optimizer` marks the ops
    inside its step() as the optimizer's."""

    def __init__(self, report: StepReport, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__()
        self.report = report
        self._in_optimizer = False
        self._scopes: list[str] = []  # open record_function scopes (FSDP2 names its own "FSDP::...")
        self._hooks = []
        if optimizer is not None:
            self._hooks = [
                optimizer.register_step_pre_hook(lambda *_: setattr(self, "_in_optimizer", True)),
                optimizer.register_step_post_hook(lambda *_: setattr(self, "_in_optimizer", False)),
            ]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = str(func.name()) if hasattr(func, "name") else str(func)
        if name.startswith("profiler::"):  # record_function markers: a scope opens (with its name) or closes
            if name.startswith("profiler::_record_function_enter"):
                self._scopes.append(str(args[0]))
            elif self._scopes:
                self._scopes.pop()
            return result
        self.report.by_op[name] += 1
        if getattr(func, "is_view", False):
            self.report.views += 1
            return result
        outs = _tensors(result)
        family = "optimizer" if self._in_optimizer else family_of(name, args, outs, self._scopes)
        read = written = 0
        if name.split("::")[-1].split(".")[0] not in _ALLOCATIONS:  # an allocation moves nothing
            mutated, out_args = _mutated(func, args, kwargs) if isinstance(func, torch._ops.OpOverload) else ([], [])
            written = _nbytes(outs + mutated)
            # a copy reads only its source, an op into an `out=` tensor does not read it; any other in-place
            # op reads what it overwrites too
            skip = {id(t) for t in (mutated if "copy" in name else out_args)}
            read = _nbytes([t for t in _tensors((args, kwargs)) if id(t) not in skip])
        f = self.report.families[family]
        f.ops += 1
        f.read += read
        f.written += written
        self.report.bytes_by_op[f"{family}: {name}"] += read + written
        return result

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


@contextlib.contextmanager
def triton_launches(counts: Counter) -> Iterator[None]:
    """Counts Triton kernel launches by name with Triton's launch hook (a no-op without Triton)."""
    try:
        from triton import knobs
    except ImportError:
        yield
        return

    def hook(metadata: Any) -> None:
        data = metadata.get() if hasattr(metadata, "get") else metadata  # a LazyDict: {"name": ..., ...}
        counts[data["name"] if isinstance(data, dict) else str(data)] += 1

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # triton 3.6+: a HookChain that several tools (proton) share
        chain.add(hook)
        try:
            yield
        finally:
            chain.remove(hook)
        return
    knobs.runtime.launch_enter_hook = hook  # a single callable slot
    try:
        yield
    finally:
        knobs.runtime.launch_enter_hook = chain


def report_step(
    step: Callable[[], Any], optimizer: torch.optim.Optimizer | None, parameters: int, world_size: int = 1
) -> tuple[StepReport, Any]:
    """Runs `step()` (one optimizer step) under the counter; returns the report and what step returned. A
    `trained_tokens` attribute or `targets` tensor on the result (train_step's StepResult) fills that count."""
    report = StepReport(parameters=parameters, world_size=world_size)
    counter = StepCounter(report, optimizer)
    try:
        with triton_launches(report.triton_launches), counter:
            result = step()
    finally:
        counter.close()
    targets = getattr(result, "targets", None)
    if targets is not None:
        report.trained_tokens = int(targets)
    return report, result
