"""Distributed setup and the sharded model: process group, device mesh, activation checkpointing,
torch.compile, FSDP2, and materialising weights shard by shard.

One code path for every machine: NCCL on CUDA, gloo on CPU, and a plain single process is a group of one.
The model is built on the meta device, wrapped from the outside in torchtitan's order (activation
checkpointing, compile, then FSDP), and only then given storage: each rank allocates its own shards and
fills them tensor by tensor from a checkpoint reader or a seeded init, so no rank holds the full model.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from c2a.config import DTYPES, LlamaConfig, TrainSection, checkpointed_block, compute_dtype
from c2a.kernels.fp8_linear import to_float8
from c2a.model.adapter import AdapterSpec
from c2a.model.llama import Llama, init_parameter
from c2a.model.lora import apply_lora, is_lora_parameter
from c2a.model.qlora import nf4_bases, quantize_lora_bases
from c2a.model.weights import CheckpointReader
from c2a.train.compute_copies import compute_copies
from c2a.train.errors import TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(replicas: int = 1, deterministic: bool = False) -> Dist:
    """Joins the torchrun group (or makes a group of one) and builds the data-parallel device mesh.

    `replicas` > 1 gives HSDP: a 2-D mesh (replicate, shard) where each of the `replicas` groups holds a
    full sharded copy and gradients are all-reduced across groups (multi-node: shard within a node).
    `deterministic` (train.deterministic) is applied first, before anything initialises CUDA.
    """
    use_deterministic(deterministic)
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    else:  # a plain `python -m c2a.train`: a group of one, on the same code path
        rank, world, local = 0, 1, 0
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if cuda else None,
        )
    if world % replicas:
        raise ValueError(f"train.replicas={replicas} must divide the number of ranks ({world})")
    if replicas > 1:
        mesh = init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return Dist(rank, world, local, device, mesh)


def use_deterministic(enabled: bool) -> None:
    """train.deterministic: torch's deterministic algorithms, under which c2a's attention backward takes its
    separate dQ pass instead of fp32 atomics, and torch raises on ops that have no deterministic version.
    cuBLAS needs a fixed workspace to be deterministic (PyTorch's reproducibility notes, CUDA >= 10.2); it
    reads CUBLAS_WORKSPACE_CONFIG when its first handle is created, hence before CUDA initialises.
    Off leaves torch's setting as it is (a caller may have turned it on)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _attention_linears(block: torch.nn.Module) -> tuple[torch.nn.Linear, ...]:
    a = block.attention
    return a.wq, a.wk, a.wv, a.wo


def _checkpointed(forward: Callable) -> Callable:
    def run(*args: torch.Tensor) -> torch.Tensor:
        # non-reentrant: works with FSDP2's hooks and torch.compile, and keeps kwargs-free autograd simple
        return checkpoint(forward, *args, use_reentrant=False)

    return run


def build_sharded_model(
    cfg: LlamaConfig, train: TrainSection, d: Dist, lora: AdapterSpec | None = None, quantize: str = "none"
) -> Llama:
    """The model on the meta device with LoRA (`lora`; with `quantize` = "nf4" around NF4 bases), activation
    checkpointing, compile and FSDP2 applied, then given (uninitialised) storage on this rank's device. Fill it
    with `materialize`."""
    dtype = compute_dtype(train, d.device)
    with torch.device("meta"):
        model = Llama(cfg)
    if train.fp8:  # 0. the blocks' linears run their matmuls in float8 (the same parameters and names)
        _float8_blocks(model, d)
    if lora is not None:
        # 0. LoRA: adapters on the target linears, everything else frozen and stored in the compute dtype (the
        #    frozen base needs no fp32 master: 2 bytes a parameter in bf16 instead of 4 + AdamW's 8 + grad's 4)
        apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, lora.rslora)
        model._apply(lambda t: t if t.requires_grad else t.to(dtype))
        if quantize == "nf4":
            # QLoRA: each adapted linear's base as NF4 codes (uint8, block-major: FSDP2 shards whole blocks)
            quantize_lora_bases(model)
    # 1. activation checkpointing: recompute a block's activations in the backward. The block's forward is
    #    replaced in place (not wrapped in another module) so parameter names, and with them checkpoints
    #    and exports, stay Meta's.
    for i, block in enumerate(model.layers):
        if checkpointed_block(train.activation_checkpointing, i, train.ac_every, train.ac_blocks):
            block.forward = _checkpointed(block.forward)
    # 2. compile each block separately: one graph reused by every layer, and graph breaks stay local.
    if train.compile:
        if d.device.type != "cuda":
            log.warning(
                "train.compile on %s: the per-document attention of the torch path reads document bounds on the "
                "host, so blocks recompile for new packings (measured: ~100 s per step for the first steps, "
                "then slower than eager); it is meant for CUDA with the Triton kernels",
                d.device.type,
            )
        for block in model.layers:
            block.compile()
    # 3. FSDP2: one unit per block, plus the root for embedding, final norm and output head. Parameters are
    #    stored (and optimised) in fp32; forward/backward run in the compute dtype; gradients are reduced
    #    in fp32. train.master_dtype = "bf16" stores them (and so AdamW's state) in bf16 with no fp32 copy;
    #    train.reduce_dtype = "bf16" reduces the gradients in bf16 (the released claude2-alpaca model did both).
    #    With LoRA, frozen and trained parameters share the units: only the adapters get gradients.
    if train.master_dtype == "bf16":
        model = model.to(torch.bfloat16)
    if train.gather_once and shard_group_size(d) == 1 and not train.cpu_offload:
        # a shard group of one has nothing to gather: the same numbers without FSDP's copies. On one rank
        # there is nothing to reduce either; with HSDP's train.replicas = ranks every rank holds the whole
        # model, and c2a.train.step sums the gradients over the ranks once per step (after the last backward)
        if d.world_size > 1:
            _check_replicated(train)
        model.to_empty(device=d.device)
        if dtype != model.tok_embeddings.weight.dtype:
            compute_copies(model, list(model.layers), dtype)
        return model
    _fully_shard(model, train, d, dtype)
    model.to_empty(device="cpu" if train.cpu_offload else d.device)  # offloaded shards are born on the host
    return model


def shard_group_size(d: Dist) -> int:
    """The ranks that share one copy of the model (the mesh's shard dimension; all of them without HSDP)."""
    return d.mesh.shape[-1]


def _check_replicated(train: TrainSection) -> None:
    """What whole copies on several ranks (train.replicas = ranks with gather_once) do not run with yet."""
    untested = {
        "train.master_dtype = bf16": train.master_dtype != "fp32",
        "train.reduce_dtype = bf16": train.reduce_dtype != "fp32",
    }
    problems = [what for what, on in untested.items() if on]
    if problems:
        raise TrainingError(
            f"train.replicas = the number of ranks with train.gather_once (every rank a whole fp32 copy, gradients "
            f"all-reduced in fp32) does not support {', '.join(problems)} yet; use fewer replicas (FSDP2 shards "
            f"each copy) or the fp32 defaults"
        )


def _float8_blocks(model: Llama, d: Dist) -> None:
    """train.fp8: every block's seven linears run their matmuls in float8 (c2a.kernels.fp8_linear)."""
    if d.device.type == "cuda" and torch.cuda.get_device_capability(d.device) < (8, 9):
        raise TrainingError(
            f"train.fp8 needs float8 matmuls (compute capability 8.9+: Ada, Hopper, Blackwell); "
            f"{torch.cuda.get_device_name(d.device)} has {torch.cuda.get_device_capability(d.device)}"
        )
    for block in model.layers:
        for linear in (
            *_attention_linears(block),
            block.feed_forward.w1,
            block.feed_forward.w2,
            block.feed_forward.w3,
        ):
            to_float8(linear)


def _fully_shard(model: Llama, train: TrainSection, d: Dist, dtype: torch.dtype) -> None:
    """FSDP2 on `model` (step 3 of build_sharded_model): the block units, then the root."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=DTYPES[train.reduce_dtype])
    # train.cpu_offload: the fp32 shards, their gradients and (since the optimizer steps them where they
    # are) AdamW's state live in host memory; each unit's all-gather copies its shards to the device first.
    # Pinned pages only where there is a device to copy to (pinning needs CUDA).
    offload = CPUOffloadPolicy(pin_memory=d.device.type == "cuda") if train.cpu_offload else OffloadPolicy()
    #    A tied head (cfg.tie_word_embeddings) is one parameter used by tok_embeddings and output, both in the
    #    root unit: FSDP2 shards, gathers and reduce-scatters it once, its gradient the sum of both uses. Keep
    #    both in one unit (separate units would each manage it); torchtitan instead re-ties after sharding.
    #    train.gather_once: a block stays unsharded after its forward (and, see c2a.train.step, after every
    #    backward but the step's last), so it is gathered and cast once per optimizer step.
    for block in model.layers:
        fully_shard(
            block, mesh=d.mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=not train.gather_once
        )
    fully_shard(
        model, mesh=d.mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False
    )  # the head runs last, then backward
    # The loss is already divided by the global number of trained tokens, so gradients are summed across
    # ranks, not averaged (FSDP's default divides by the world size). Also in a group of one, where the
    # division by 1 is exact: FSDP2 without a factor there skips its reduce buffers, which the planner's
    # peak does not model (tests/test_plan.py's FSDPMemTracker check: +15.9% on a 32k-vocab head); with
    # train.gather_once a group of one has no FSDP at all.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # per FSDP unit: the setting does not recurse
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


@torch.no_grad()
def materialize(
    model: Llama, reader: CheckpointReader | None, seed: int, adapter: dict[str, torch.Tensor] | None = None
) -> None:
    """Fills every shard: from `reader` (pretrained), or with the init rule drawn from a per-parameter seed.

    Either way each rank computes the full tensor of one parameter at a time and keeps its own slice
    (`distribute_tensor(..., src_data_rank=None)` slices locally, no communication), so the result is
    identical for any number of ranks and no rank ever holds the whole model. LoRA's A and B come from
    `adapter` (lora.init_adapter's, in c2a's names) or, without one, from the init rule (PEFT's).
    """
    bases = nf4_bases(model)  # QLoRA: weight name -> its NF4Linear
    nf4 = {id(t) for base in bases.values() for t in (base.codes, base.qabsmax)}
    for name, p in model.named_parameters():
        if id(p) in nf4:
            continue  # filled below, from the weight they quantize
        if adapter is not None and name in adapter:
            full = adapter[name]
        else:
            full = _initial_weight(model, name, p.shape, reader, seed)
        _fill(p, full.to(device=p.device, dtype=p.dtype))
    for name, base in bases.items():
        # the base weight as read (or drawn), quantized whole on every rank: each keeps its own blocks
        q = base.quantize(_initial_weight(model, name, base.shape, reader, seed), name)
        for p, full in ((base.codes, q.codes), (base.qabsmax, q.qabsmax)):
            _fill(p, full.to(p.device))
        base.absmax2.copy_(q.absmax2)
        base.offset.copy_(q.offset)


def _initial_weight(
    model: Llama, name: str, shape: torch.Size, reader: CheckpointReader | None, seed: int
) -> torch.Tensor:
    """The full tensor `name` starts from: the checkpoint's, else the init rule's from a per-name seed."""
    if reader is not None and not is_lora_parameter(name):
        return reader.get(name)
    full = torch.empty(shape, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    init_parameter(full, name, model.cfg, generator=g)
    return full


def _fill(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copies `full` into `p`, or this rank's slice of it when `p` is a shard (sliced locally, no communication)."""
    if isinstance(p, DTensor):
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
    else:
        p.copy_(full)


def full_parameters(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Every parameter gathered in full, one at a time: a collective, so every rank must iterate it.
    Yields CPU tensors on rank 0 and None elsewhere."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        yield name, (full.to("cpu", dtype or full.dtype) if rank == 0 else None)


def shutdown_and_exit(code: int) -> None:
    """Ends a distributed process cleanly, without the "terminate called without an active exception"
    SIGABRT that gloo runs hit at exit about one time in eight (more often with 4 ranks on 2 cores).

    The cause (seen in gdb): ProcessGroupGloo's worker threads ("pt_gloo_runloop") release each finished
    Work on their own thread, and a Work holds tensors whose release needs the GIL. When the main thread
    has already begun interpreter finalization, a worker that asks for the GIL is terminated with
    pthread_exit, whose forced unwind through a noexcept C++ destructor calls std::terminate.
    `destroy_process_group()` alone does not prevent it: the device mesh and the FSDP state still
    reference the group, so its threads outlive the call. So: drain pending work with a barrier, destroy
    the group, flush what Python would have flushed, and leave with os._exit, skipping the finalization
    that races the worker threads. Every file the run writes is closed (and checkpoints fsynced) by then.
    """
    if dist.is_initialized():
        if code == 0:  # after an error the other ranks may never reach a barrier: do not wait for them
            dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
