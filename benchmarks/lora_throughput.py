"""LoRA and QLoRA training throughput and memory: c2a's LoRA and QLoRA against PEFT + transformers (QLoRA: with
bitsandbytes), and against c2a's own full fine-tune, side by side in one run.

    python benchmarks/lora_throughput.py [--out DIR] [--rank 16] [--repeats R] [--smoke] [--sides A,B,...]

  c2a-lora  c2a's LoRA path as the trainer runs it: the model built by `build_sharded_model` with rank-r adapters
            (alpha 2r) on all seven linears of every block, the base frozen, AdamW over the adapters, packed rows,
            one `train_step` per optimizer step.
  peft      PEFT + transformers: LlamaForCausalLM of the same dimensions, `peft.get_peft_model` with the same
            LoraConfig (target_modules "all-linear"), fed the same packed rows without padding (padding-free
            packing: position_ids restart per document and transformers builds the block-diagonal mask from
            them, use_cache=False), the loss from full logits, torch AdamW, clipping at 1.0.
  c2a-full  c2a's full fine-tune of the same model on the same rows (every weight trained).
  c2a-qlora c2a-lora with lora.quantize = "nf4": every adapted linear's base in NF4, dequantized in its forward
            and backward.
  peft-qlora  peft with every block linear a bitsandbytes Linear4bit (nf4, blocksize 64, double quant, compute
            dtype the run's), as PEFT + bitsandbytes QLoRA runs; bitsandbytes 0.50 runs it on CPU tensors.

Data, model and step sizes are train_throughput.py's (synthetic Alpaca-like examples, CPU: dim 256, 4 layers,
vocab 32000, rows of 2048, 32 examples a step); each side runs in its own fresh process and reports trained
tokens/s (wall), trained tokens per CPU-second of its process (steadier on a shared machine) and peak memory
(RSS on CPU, max allocated on CUDA). Writes DIR/lora_throughput.json; never asserts a
time. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import (  # noqa: E402
    IGNORE,
    Setup,
    StepStats,
    SyntheticAlpaca,
    _ffn,
    default_setup,
    environment,
    peak_memory_mib,
    run_c2a,
    sync,
)

SIDES = ("c2a-qlora", "peft-qlora", "c2a-lora", "peft", "c2a-full")
# each ratio: (c2a side, the side it is compared with), where both ran
RATIOS = (("c2a-qlora", "peft-qlora"), ("c2a-qlora", "c2a-lora"), ("c2a-qlora", "c2a-full"))
RATIOS += (("c2a-lora", "peft"), ("c2a-lora", "c2a-full"))


@torch.no_grad()
def bnb_nf4_blocks(model: Any, compute_dtype: torch.dtype) -> None:
    """In place: every linear of every block of a transformers Llama becomes a bitsandbytes Linear4bit holding
    its weight in NF4 (blocksize 64, double quantization), as BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) loads it."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                    compress_statistics=True, quant_type="nf4",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
                )
                setattr(parent, name, q.to(linear.weight.device))


TARGETS = ("w1", "w2", "w3", "wk", "wo", "wq", "wv")


def run_peft(
    s: Setup, data: SyntheticAlpaca, rank: int, quantize: bool = False
) -> tuple[list[StepStats], dict[str, Any]]:
    import peft
    import transformers

    from c2a.config import DataSection, TrainConfig, TrainSection
    from c2a.train.parallel import init_distributed
    from c2a.train.run_data import make_loader

    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=s.dim,
        intermediate_size=_ffn(s),
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads,
        num_key_value_heads=s.n_kv_heads,
        vocab_size=s.vocab_size,
        max_position_embeddings=max(4096, s.seq_len),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    with device:
        base = transformers.LlamaForCausalLM(hf_cfg)
    if quantize:
        bnb_nf4_blocks(base, torch.bfloat16 if s.dtype == "bf16" else torch.float32)
    lora_cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(base, lora_cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0, fused=device.type == "cuda")
    # the same packed rows as the c2a sides (c2a's loader only batches here; the model and step are PEFT's)
    cfg = TrainConfig(
        data=DataSection(max_len=s.seq_len, packing=True),
        train=TrainSection(global_batch=s.global_batch, micro_batch=s.rows_per_micro, seed=s.seed),
    )
    loader, desc = make_loader(cfg, data, init_distributed())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.dtype == "bf16")
    batches, stats = iter(loader), []
    for _ in range(s.warmup + s.steps):
        sync(device)
        start = time.perf_counter()
        micro = [next(batches).to(device) for _ in range(loader.accum_steps)]
        targets = sum(int((b.labels != IGNORE).sum()) for b in micro)
        loss_sum = 0.0
        for b in micro:
            with autocast:
                logits = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), b.labels.flatten(), ignore_index=IGNORE, reduction="sum"
            ) / max(targets, 1)
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - start
        if not math.isfinite(loss_sum):
            raise RuntimeError(f"peft: non-finite loss {loss_sum}")
        stats.append(
            StepStats(
                seconds,
                sum(b.num_examples for b in micro),
                targets,
                sum(b.num_tokens for b in micro),
                sum(b.input_ids.numel() for b in micro),
                sum(b.sum_len_sq for b in micro),
            )
        )
    info = {
        "batching": desc,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": sum(p.numel() for p in params),
        "final_loss": loss_sum,
        "attention": base.config._attn_implementation,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }
    return stats, info


def side_main(side: str, s: Setup, rank: int, out: Path) -> None:
    if s.threads:
        torch.set_num_threads(s.threads)
    data = SyntheticAlpaca(s)
    cpu_start = time.process_time()
    if side.startswith("peft"):
        stats, info = run_peft(s, data, rank, quantize=side == "peft-qlora")
    else:
        from c2a.model.adapter import AdapterSpec

        lora = AdapterSpec(rank, 2.0 * rank, 0.0, TARGETS) if side != "c2a-full" else None
        stats, info = run_c2a(s, data, lora, "nf4" if side == "c2a-qlora" else "none")
    cpu_seconds = time.process_time() - cpu_start
    timed = stats[s.warmup :]
    seconds = sum(t.seconds for t in timed)
    summary = {
        "side": side,
        # trained tokens of every step (warm-up included) per second of this process's CPU time (all its threads,
        # the model's build included): on a machine shared with other jobs, far steadier than wall time
        "trained_tokens_per_cpu_s": sum(t.trained_tokens for t in stats) / cpu_seconds,
        "trained_tokens_per_s": sum(t.trained_tokens for t in timed) / seconds,
        "best_step_trained_tokens_per_s": max(t.trained_tokens / t.seconds for t in timed),
        "tokens_per_s": sum(t.tokens for t in timed) / seconds,
        "step_seconds": seconds / len(timed),
        "peak_memory_mib": peak_memory_mib(torch.device(s.device)),
        "step_seconds_each": [t.seconds for t in stats],
        "threads": torch.get_num_threads(),
        **info,
    }
    out.write_text(json.dumps(summary, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_side(side: str, s: Setup, rank: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--setup", json.dumps(asdict(s))]
        cmd += ["--rank", str(rank), "--side-out", str(out)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternating; each keeps its fastest")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks every side runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {','.join(SIDES)}")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        raw = json.loads(args.setup)
        raw["prompt_range"], raw["response_range"] = tuple(raw["prompt_range"]), tuple(raw["response_range"])
        side_main(args.side, Setup(**raw), args.rank, args.side_out)
        return
    values = default_setup(args.smoke, args.device)
    if args.threads:
        values["threads"] = args.threads
    s = Setup(**values)
    print(f"setup: {asdict(s)}, rank {args.rank}", flush=True)
    summary: dict[str, Any] = {"environment": environment(), "setup": asdict(s), "rank": args.rank, "runs": {}}
    sides = [x for x in SIDES if x in args.sides.split(",")]
    for _ in range(args.repeats):
        for side in sides:  # alternating, so a busy spell on a shared machine does not hit one side only
            r = run_side(side, s, args.rank)
            summary["runs"].setdefault(side, []).append(r)
            print(
                f"{side}: {r['trained_tokens_per_s']:,.0f} trained tokens/s, {r['trained_tokens_per_cpu_s']:,.0f} per "
                f"CPU-s, {r['peak_memory_mib']:,.0f} MiB",
                flush=True,
            )
    best = {side: max(runs, key=lambda r: r["trained_tokens_per_s"]) for side, runs in summary["runs"].items()}
    peak = {side: max(r["peak_memory_mib"] for r in runs) for side, runs in summary["runs"].items()}
    cpu = {side: max(r["trained_tokens_per_cpu_s"] for r in runs) for side, runs in summary["runs"].items()}
    summary["ratios"] = {
        f"{ours} / {other}": {
            "trained_tokens_per_s": best[ours]["trained_tokens_per_s"] / best[other]["trained_tokens_per_s"],
            "trained_tokens_per_cpu_s": cpu[ours] / cpu[other],
            "peak_memory_mib": peak[ours] / peak[other],
        }
        for ours, other in RATIOS
        if ours in best and other in best
    }
    summary["environment"]["load_average_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_throughput.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'':<24}" + "".join(f"{side:>14}" for side in sides))
    print(f"{'trained tokens/s':<24}" + "".join(f"{best[x]['trained_tokens_per_s']:>14,.0f}" for x in sides))
    print(f"{'trained tokens/CPU-s':<24}" + "".join(f"{cpu[x]:>14,.0f}" for x in sides))
    print(f"{'peak memory (MiB)':<24}" + "".join(f"{peak[x]:>14,.0f}" for x in sides))
    for name, r in summary["ratios"].items():
        print(
            f"{name}: {r['trained_tokens_per_s']:.2f}x the speed ({r['trained_tokens_per_cpu_s']:.2f}x per CPU-second) "
            f"at {r['peak_memory_mib']:.2f}x the memory"
        )


if __name__ == "__main__":
    main()
