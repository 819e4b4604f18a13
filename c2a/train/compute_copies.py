"""Mixed precision in a group of one, without FSDP: compute-dtype copies of the fp32 parameters, cast once
per optimizer step (train.gather_once on one rank).

FSDP2 in a group of one still does, for every micro-batch's forward and backward, what it does for many
ranks: it casts each fp32 shard to the compute dtype (the "all-gather"), and it copies each gradient into a
flat fp32 reduce-scatter buffer (chunk_cat), out of it again and into the fp32 gradient. Here instead:

  - the model's parameters stay the fp32 master weights: the optimizer, clipping, checkpoints and exports
    see exactly what they see under FSDP2 in a group of one (whole fp32 tensors, fp32 gradients);
  - a compute-dtype leaf per parameter is cast from it when the master changed (the optimizer stepped it,
    `masters_stepped`, or its version counter moved: once per optimizer step) and swapped into the modules
    while the model runs: for a step's whole set of micro-batches (`held`, around their forwards and
    backwards, so that activation checkpointing recomputes with them), or for one forward (validation,
    generation);
  - each leaf's gradient is added to its master's fp32 gradient as autograd finishes it (a post-accumulate
    hook), the leaf's own freed: fp32(g0) + fp32(g1) + ..., the sums FSDP2 forms;
  - floating-point inputs of the root and of every block are cast to the compute dtype, as
    MixedPrecisionPolicy(cast_forward_inputs=True) does (the loss normalizer among them).

So losses and gradients are the ones FSDP2 gives in a group of one, bit for bit (tests/test_step_cuts.py),
for one cast and no copies per step. Memory: the compute-dtype copy of the model stays allocated (2 bytes a
parameter in bf16), where FSDP2 holds one block's at a time.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp._fully_shard._fsdp_common import _cast_fp_tensor
from torch.distributed.utils import _apply_to_tensors

_OF_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ComputeCopies:
    def __init__(self, model: nn.Module, units: list[nn.Module], dtype: torch.dtype) -> None:
        self.dtype = dtype
        # every (module, name) slot that holds a parameter: a tied weight fills two slots with one master
        self.slots = [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if p is not None]
        self.masters = list({id(p): p for _, _, p in self.slots}.values())
        self.copies: dict[int, nn.Parameter] = {}
        self.versions: dict[int, int] = {}
        self.depth = 0
        for unit in [model, *units]:
            unit.register_forward_pre_hook(self._cast_inputs, with_kwargs=True)
        model.register_forward_pre_hook(lambda *_: self.enter())
        model.register_forward_hook(lambda *_: self.exit())
        _OF_MODEL[model] = self

    def _cast_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cast = functools.partial(_cast_fp_tensor, self.dtype)
        return _apply_to_tensors(cast, args), _apply_to_tensors(cast, kwargs)

    @torch.no_grad()
    def _refresh(self) -> None:
        """The one cast per optimizer step: each copy whose master changed since it was cast, all in one
        foreach copy (one multi-tensor launch on a GPU, one dispatch instead of one a parameter)."""
        stale: list[nn.Parameter] = []
        for p in self.masters:
            c = self.copies.get(id(p))
            if c is None:
                c = self.copies[id(p)] = nn.Parameter(torch.empty_like(p, dtype=self.dtype))
                c.register_post_accumulate_grad_hook(functools.partial(_accumulate, p))
            elif self.versions.get(id(p)) == p._version:
                continue
            stale.append(p)
        if stale:
            torch._foreach_copy_([self.copies[id(p)] for p in stale], stale)
        for p in stale:
            self.versions[id(p)] = p._version

    def enter(self) -> None:
        if self.depth == 0:
            self._refresh()
            for module, name, p in self.slots:
                module._parameters[name] = self.copies[id(p)]
        self.depth += 1

    def exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            for module, name, p in self.slots:
                module._parameters[name] = p

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.exit()


@torch.no_grad()
def _accumulate(master: nn.Parameter, copy: nn.Parameter) -> None:
    if master.grad is None:
        master.grad = copy.grad.to(master.dtype)
    else:
        master.grad += copy.grad
    copy.grad = None


def compute_copies(model: nn.Module, units: list[nn.Module], dtype: torch.dtype) -> ComputeCopies:
    """Gives `model` (its parameters fp32, with storage) compute-dtype copies; `units` are the modules
    whose floating-point inputs are cast as FSDP2's units' are (the blocks)."""
    return ComputeCopies(model, units, dtype)


def masters_stepped(model: nn.Module) -> None:
    """Marks every compute copy of `model` stale: the optimizer has just stepped the masters. The version
    counters catch any other in-place change (a checkpoint load), but not this one everywhere: under a
    TorchDispatchMode (the step report's) torch 2.13's foreach and fused in-place ops leave them unchanged."""
    copies = _OF_MODEL.get(model)
    if copies is not None:
        copies.versions.clear()


def held(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Keeps `model`'s compute copies in place across several forwards and backwards (a no-op for a
    model without them)."""
    copies = _OF_MODEL.get(model)
    return copies.held() if copies is not None else contextlib.nullcontext()
