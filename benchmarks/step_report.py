"""The step report of one optimizer step of the trainer, at any world size and accumulation, on any machine.

    torchrun --nproc_per_node=N benchmarks/step_report.py [--accum 3] [--smoke] [--out FILE.json]
                                                            [--train.KEY=VALUE ...]

The model and step are the trainer's (`build_sharded_model`, `materialize`, `build_optimizer`, `train_step`),
with `--train.*` settings as the trainer takes them. Each rank's micro-batches are padded rows of `--seq-len`
positions, `--rows` per micro-batch, `--accum` per step: the first 3/4 of each row real tokens with seeded
random ids, the response (the second half of those) trained, the rest padding. The default model is the
20M-parameter one of the CPU goals (dim 256, 4 layers, 4 heads, vocab 32000), bf16 compute. The first
`--warmup` steps (AdamW's state is created in the first) are not counted; the next is, by
c2a.train.step_report on every rank, and rank 0 prints its table and writes the JSON; `--timed N` steps
follow, timed in wall and in the process's CPU seconds. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from c2a.config import LlamaConfig, build_config  # noqa: E402
from c2a.data.batching import MicroBatch  # noqa: E402
from c2a.train.optim import build_optimizer  # noqa: E402
from c2a.train.parallel import build_sharded_model, init_distributed, materialize, shutdown_and_exit  # noqa: E402
from c2a.train.step import StepWork, train_step  # noqa: E402
from c2a.train.step_report import report_step  # noqa: E402


def micro_batches(rows: int, seq_len: int, vocab: int, accum: int, step: int, rank: int) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    real, prompt = seq_len * 3 // 4, seq_len * 3 // 8
    out = []
    for _ in range(accum):
        ids = torch.zeros(rows, seq_len, dtype=torch.long)
        ids[:, :real] = torch.randint(3, vocab, (rows, real), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, prompt : real - 1] = ids[:, prompt + 1 : real]
        pos = torch.arange(seq_len).expand(rows, seq_len).clone()
        trained = int((labels != -100).sum())
        out.append(MicroBatch(ids, labels, pos, rows, rows * real, rows * real * real, trained))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=1, help="rows per micro-batch")
    ap.add_argument("--accum", type=int, default=3, help="micro-batches per step on each rank")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timed", type=int, default=0, help="then time this many steps (outside the counter)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and rows: checks the report runs (CI)")
    ap.add_argument("--out", type=Path, help="write rank 0's report here as JSON")
    args, rest = ap.parse_known_args()
    if args.smoke:
        args.dim, args.n_layers, args.vocab, args.seq_len = 64, 2, 512, 64
    overrides = {"train.dtype": "bf16", **dict(a.removeprefix("--").split("=", 1) for a in rest)}
    cfg = build_config({}, {"out_dir": tempfile.mkdtemp(prefix="c2a-step-report-"), **overrides})
    d = init_distributed(cfg.train.replicas)
    model_cfg = LlamaConfig(
        dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_heads, vocab_size=args.vocab
    )
    model = build_sharded_model(model_cfg, cfg.train, d)
    materialize(model, None, cfg.train.seed)
    optimizer = build_optimizer(model, cfg, d.device)
    model.train()

    def step(i: int):
        batches = micro_batches(args.rows, args.seq_len, args.vocab, args.accum, i, d.rank)
        return train_step(model, optimizer, batches, cfg.train.grad_clip, d.device, work=StepWork.of(cfg.train))

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    report, result = report_step(lambda: step(args.warmup), optimizer, model_cfg.num_params, d.world_size)
    seconds = time.perf_counter() - start
    walls, cpus = [], []
    for i in range(args.timed):  # wall time, and this process's CPU time (less sensitive to a busy machine)
        wall, cpu = time.perf_counter(), time.process_time()
        float(step(args.warmup + 1 + i).loss)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    if d.is_main:
        summary = {
            "settings": overrides,
            "accum": args.accum,
            "rows": args.rows,
            "seq_len": args.seq_len,
            "loss": float(result.loss),
            "counted_step_seconds": seconds,
            "timed_wall_seconds": walls,
            "timed_cpu_seconds": cpus,
            "trained_tokens_per_step": report.trained_tokens,
            **report.as_dict(),
        }
        print(f"settings {overrides}, accumulation {args.accum}, loss {summary['loss']:.4f}")
        print(report.table(), flush=True)
        if walls:
            tokens = report.trained_tokens
            print(
                f"timed steps: best wall {min(walls):.2f} s ({tokens / min(walls):,.0f} trained tokens/s), "
                f"best CPU {min(cpus):.2f} s ({tokens / min(cpus):,.0f} trained tokens per CPU-second)",
                flush=True,
            )
        if args.out:
            args.out.write_text(json.dumps(summary, indent=1) + "\n")
    shutdown_and_exit(0)


if __name__ == "__main__":
    main()
