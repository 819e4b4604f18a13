"""Run by torchrun from test_lowbit_distributed.py, 2 gloo ranks, one launch for both low-bit features:

    torchrun --nproc_per_node=2 tests/dist_lowbit.py OUT_DIR

NF4: NF4Linear layers (c2a/model/quantized.py) sharded by FSDP2 (bf16 compute), each rank's shard shapes, and
the dequantized weights, outputs and input gradients of the gathered layers -> OUT_DIR/nf4.pt (rank 0).
adamw8bit (when torchao is installed): a small Llama sharded by FSDP2 with train.optimizer = "adamw8bit", 6
steps straight through, and 3 steps, a checkpoint (c2a.train.checkpoint, DCP), a fresh model and optimizer
loaded from it and 3 more steps; losses, parameters and optimizer states -> OUT_DIR/adamw8bit_rank{r}.pt;
and test_plan.py's FSDPMemTracker measurement of an adamw8bit step (PLAN_SPEC) -> OUT_DIR/plan.json.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from test_plan import measure
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from c2a.config import LlamaConfig, build_config
from c2a.model import Llama
from c2a.model.quantized import NF4Linear
from c2a.train.checkpoint import checkpoint_root, load_checkpoint, save_checkpoint
from c2a.train.optim import build_optimizer, build_scheduler
from c2a.train.parallel import init_distributed

# test_plan.py's SPEC: dim 256 so that the block matrices' shards reach torchao's 4,096-value minimum for 8 bits
PLAN_SPEC = "adamw8bit-small:256:2:4:2:1000:2:64:packed:none:1:0:adamw8bit"
# (out, in): 5,184 blocks (2,592 a rank), 300 blocks, 3 blocks (2 and 1: an uneven split), 91 weights (2 blocks)
NF4_SHAPES = [(576, 576), (96, 200), (3, 64), (7, 13)]


def nf4_cases() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The weights, the input x [2, 5, 576] and the output gradients' seed, the same in every process."""
    g = torch.Generator().manual_seed(7)
    weights = [(0.02 * torch.randn(shape, generator=g)).bfloat16() for shape in NF4_SHAPES]
    x = torch.randn(2, 5, 576, generator=g).bfloat16()
    return weights, x, torch.randn(2, 5, 576, generator=g).bfloat16()


def nf4_reference(layers: list[NF4Linear], x: torch.Tensor, dy_seed: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Each layer applied to x's first `in` features: output, dx, and the dequantized weight."""
    out: dict[str, list[torch.Tensor]] = {"y": [], "dx": [], "weight": []}
    for layer in layers:
        xi = x[..., : layer.in_features].clone().requires_grad_()
        y = layer(xi)
        y.backward(dy_seed[..., : layer.out_features])
        out["y"].append(y.detach())
        out["dx"].append(xi.grad)
    return out


def run_nf4(out_dir: Path, d) -> None:
    weights, x, dy = nf4_cases()
    layers = nn.ModuleList(NF4Linear.from_weight(w, f"layer{i}") for i, w in enumerate(weights))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:  # each layer its own FSDP2 root: gathered for its forward, resharded after its backward
        fully_shard(layer, mesh=d.mesh, mp_policy=mp)
    shards = [(tuple(layer.codes.to_local().shape), tuple(layer.qabsmax.to_local().shape)) for layer in layers]
    result = nf4_reference(list(layers), x, dy)
    for layer in layers:
        layer.unshard()
        result["weight"].append(layer.dequantized(torch.bfloat16))
        layer.reshard()
    gathered: list = [None] * d.world_size
    torch.distributed.all_gather_object(gathered, shards)
    if d.is_main:
        torch.save({**result, "shards": gathered}, out_dir / "nf4.pt")


def tiny_llama(d) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64, max_seq_len=64)
    model = Llama(cfg)
    for block in model.layers:
        fully_shard(block, mesh=d.mesh)
    fully_shard(model, mesh=d.mesh)
    return model


def adamw8bit_steps(model: Llama, optimizer, scheduler, steps: range) -> list[float]:
    """The trainer's step on two alternating batches (rank r takes row r): loss, backward, clip at 1.0,
    step, schedule."""
    losses = []
    for s in steps:
        ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(s % 2))[
            torch.distributed.get_rank()
        ]
        loss = model.loss(ids[None, :-1], ids[None, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    return losses


def run_adamw8bit(out_dir: Path, d) -> None:
    cfg = build_config({}, {"train.optimizer": "adamw8bit", "train.weight_decay": "0.1", "train.lr": "3e-3"})
    schedule = {"total_steps": 6, "warmup_steps": 2, "lr": cfg.train.lr, "min_lr_ratio": 0.1}
    straight = tiny_llama(d)
    opt = build_optimizer(straight, cfg, d.device)
    straight_losses = adamw8bit_steps(straight, opt, build_scheduler(opt, schedule), range(6))

    first = tiny_llama(d)
    opt1 = build_optimizer(first, cfg, d.device)
    sched1 = build_scheduler(opt1, schedule)
    losses = adamw8bit_steps(first, opt1, sched1, range(3))
    checkpoint_root(out_dir / "run").mkdir(parents=True, exist_ok=True)  # the trainer's session makes it
    path = save_checkpoint(out_dir / "run", 3, first, opt1, {"scheduler": sched1.state_dict()}, keep_last=1)
    resumed = tiny_llama(d)
    opt2 = build_optimizer(resumed, cfg, d.device)
    sched2 = build_scheduler(opt2, schedule)
    sched2.load_state_dict(load_checkpoint(path, resumed, opt2)["scheduler"])
    losses += adamw8bit_steps(resumed, opt2, sched2, range(3, 6))

    def states(model, optimizer):
        return {
            name: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in optimizer.state[p].items()}
            for name, p in model.named_parameters()
        }

    torch.save(
        {
            "straight_losses": straight_losses,
            "resumed_losses": losses,
            "straight_params": {n: p.to_local() for n, p in straight.named_parameters()},
            "resumed_params": {n: p.to_local() for n, p in resumed.named_parameters()},
            "straight_states": states(straight, opt),
            "resumed_states": states(resumed, opt2),
        },
        out_dir / f"adamw8bit_rank{d.rank}.pt",
    )


def main(out_dir: Path) -> None:
    d = init_distributed()
    run_nf4(out_dir, d)
    if importlib.util.find_spec("torchao") is not None:
        run_adamw8bit(out_dir, d)
        measured: list = [None] * d.world_size
        torch.distributed.all_gather_object(measured, measure(PLAN_SPEC, d))
        if d.is_main:
            (out_dir / "plan.json").write_text(json.dumps(measured))
    # No destroy_process_group(), as in the project's other torchrun scripts: with it, a rank aborted in gloo's
    # teardown about one launch in six ("terminate called without an active exception", SIGABRT, after its
    # last collective); the processes exit and torchrun reaps them.
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
