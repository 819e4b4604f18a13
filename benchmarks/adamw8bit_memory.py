"""Optimizer state of train.optimizer = "adamw8bit" against "adamw", measured side by side on one model, next to
the planner's prediction, and the optimizer step's time.

    python benchmarks/adamw8bit_memory.py [--out DIR] [--dim 512] [--layers 2] [--vocab 8000] [--steps 3]

Both optimizers are built by the trainer's build_optimizer on the same Llama (fp32 parameters, one process)
and stepped on the same gradients; the state is every tensor the optimizer holds, counted byte by byte
(torchao's 8-bit state: codes, scales and code maps). Off CUDA the 8-bit update runs eagerly
(c2a/train/adamw8bit.py), so its step time there is torchao's unfused ops, not what a GPU runs. Writes
DIR/adamw8bit_memory.json; prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from c2a.config import LlamaConfig, build_config
from c2a.model import Llama
from c2a.plan.memory import Workload, optimizer_bytes
from c2a.train.optim import build_optimizer


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for t in state.values():
            parts = [getattr(t, name) for name in ("codes", "scale", "qmap") if hasattr(t, name)] or [t]
            total += sum(x.numel() * x.element_size() for x in parts)
    return total


def measure(model_cfg: LlamaConfig, optimizer: str, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = Llama(model_cfg).to(device)
    opt = build_optimizer(model, build_config({}, {"train.optimizer": optimizer}), device)
    times = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = 1e-3 * torch.randn_like(p)
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    measured = state_bytes(opt)
    planned = optimizer_bytes(Workload(model_cfg, 1, 8, ranks=1, optimizer=optimizer))
    return {
        "optimizer": optimizer,
        "params": params,
        "state_bytes": measured,
        "planned_bytes": planned,
        "bytes_per_param": round(measured / params, 4),
        "step_s": round(statistics.median(times[1:] or times), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads = args.dim // 64
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=heads, n_kv_heads=heads, vocab_size=args.vocab)
    rows = [measure(cfg, name, args.steps, device) for name in ("adamw", "adamw8bit")]
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {os.cpu_count()} cores"
    print(f"optimizer state, Llama dim {args.dim} x {args.layers} layers, vocab {args.vocab}, on {machine}")
    print(f"{'optimizer':>10} {'params':>12} {'state MB':>10} {'planned MB':>11} {'B/param':>8} {'step s':>8}")
    for r in rows:
        print(
            f"{r['optimizer']:>10} {r['params']:>12,} {r['state_bytes'] / 1e6:10.2f} {r['planned_bytes'] / 1e6:11.2f} "
            f"{r['bytes_per_param']:8.3f} {r['step_s']:8.3f}"
        )
    ratio = rows[1]["state_bytes"] / rows[0]["state_bytes"]
    print(f"adamw8bit / adamw state: {ratio:.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "platform": platform.platform(), "rows": rows, "ratio": ratio}
    (Path(args.out) / "adamw8bit_memory.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
