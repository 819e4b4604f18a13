"""Run by torchrun from test_lora_train.py: every LoRA training variant in one launch (2 gloo ranks).

    torchrun --nproc_per_node=2 tests/lora_train_runs.py WORK VARIANT [VARIANT ...]

For each VARIANT, WORK/VARIANT holds `base/` (a tiny HF Llama saved by transformers, with the demo
tokenizer) and `init_adapter/` (a PEFT adapter PEFT saved for it). This script runs the trainer's own
start / train_loop / finish on WORK/alpaca.jsonl:
- `full/`: 6 optimizer steps (packed rows, full activation checkpointing, accumulation over micro-batches),
  checkpoints at steps 3 and 6, then checks on rank 0 that every frozen parameter is bit-equal to the base
  it was read from and that a tied head is still the embedding (WORK/VARIANT/frozen.json);
- `resumed/`: a copy of full/ cut back to its step-3 checkpoint, resumed to the end;
- `changed/`: the same cut-back copy resumed on another base (the next variant's, or a copy of this base
  with another norm_eps), which must be refused, its message written to WORK/VARIANT/changed.txt;
and the first variant once more as HSDP (train.replicas = 2: two replicas of one shard) in `hsdp/`; with
validation (data.val_fraction, eval.every = 2) uninterrupted in `val/` and in `stopped/` stopped by a real
SIGTERM (raised on rank 1 after step 3's optimizer step: every rank stops at step 4 with a checkpoint; the
RunStopped's step and checkpoint are written to WORK/VARIANT/stopped.json) and resumed to the end; and with
train.cpu_offload in `offload/`.

The variant named `qlora` (given last) runs with lora.quantize = nf4 instead: `full/` (its check writes
WORK/qlora/frozen.json: the unquantized frozen parameters bit-equal to the base, and per NF4 base whether
each rank holds only a slice of its codes and whether the gathered codes are those of the base's weight),
`resumed/` from step 3, and `changed/`, the same checkpoint resumed with lora.quantize = none, refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from c2a.config import build_config
from c2a.errors import UserError
from c2a.model.qlora import nf4_bases
from c2a.model.weights import CheckpointReader
from c2a.train.lifecycle import RunStopped, _held
from c2a.train.loop import finish, train_loop
from c2a.train.parallel import init_distributed, shutdown_and_exit
from c2a.train.session import claim, start

STEPS = 6


def config(work: Path, variant: str, out: str, base: Path, **more: str):
    return build_config(
        {},
        more
        | {
            "out_dir": str(work / variant / out),
            "model.checkpoint": str(base),
            "data.path": str(work / "alpaca.jsonl"),
            "data.max_len": "64",
            "train.micro_batch": "1",
            "train.global_batch": "8",
            "train.max_steps": str(STEPS),
            "train.save_every": "3",
            "train.keep_last": "3",
            "train.lr": "1e-2",
            "train.weight_decay": "0.1",
            "train.dtype": "fp32",
            "train.activation_checkpointing": "full",
            "train.progress": "false",
            "train.log_every": "1",
            "lora.init_adapter": str(work / variant / "init_adapter"),
        },
    )


def qlora_config(work: Path, out: str, **more: str):
    return config(work, "qlora", out, work / "qlora" / "base", **({"lora.quantize": "nf4"} | more))


def train(cfg, d):
    claim(cfg, d)
    s = start(cfg, d)
    train_loop(s)
    finish(s, demo=False, run_start=time.perf_counter())
    return s


VAL = {"data.val_fraction": "0.25", "eval.every": "2"}


def stop_and_resume(work: Path, variant: str, d) -> None:
    """stopped/: a real SIGTERM on rank 1 after step 3's optimizer step, then the same config resumed."""
    cfg = config(work, variant, "stopped", work / variant / "base", **VAL)
    claim(cfg, d)
    s = start(cfg, d)
    if d.rank == 1:
        session = s  # s.step counts the finished steps: 2 while step 3 runs
        s.optimizer.register_step_post_hook(
            lambda opt, args, kwargs: signal.raise_signal(signal.SIGTERM) if session.step == 2 else None
        )
    try:
        train_loop(s)
        report = {"stopped": None}
    except RunStopped as e:
        report = {"stopped": e.step, "checkpoint": str(e.checkpoint)}
    if d.is_main:
        (work / variant / "stopped.json").write_text(json.dumps(report))
        _held.pop().release()  # the out_dir lock, as the stopped process's exit would drop it
    del s
    dist.barrier()
    train(config(work, variant, "stopped", work / variant / "base", **VAL), d)


def check_frozen(s, base: Path, into: Path, is_main: bool) -> None:
    """Every frozen parameter gathered and compared bitwise with the base checkpoint's tensor."""
    reader = CheckpointReader(base) if is_main else None
    report = {"frozen": 0, "changed": [], "tied": s.model.output.weight is s.model.tok_embeddings.weight}
    bases = nf4_bases(s.model)
    if bases:
        report |= check_nf4(bases, reader, is_main)
    nf4 = {id(t) for b in bases.values() for t in (b.codes, b.qabsmax)}
    for name, p in s.model.named_parameters():
        if p.requires_grad or id(p) in nf4:
            continue
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if is_main:
            report["frozen"] += 1
            if not torch.equal(full.cpu(), reader.get(name).to(full.dtype)):
                report["changed"].append(name)
    if is_main:
        into.write_text(json.dumps(report))


def check_nf4(bases: dict, reader, is_main: bool) -> dict:
    """Per NF4 base: every rank holds a strict slice of its codes (all-reduced), and the gathered codes and
    absmaxes are those of the base's weight quantized (rank 0)."""
    sliced = torch.tensor([sum(b.codes.to_local().numel() < b.codes.numel() for b in bases.values())])
    dist.all_reduce(sliced, op=dist.ReduceOp.MIN)
    report = {"nf4": len(bases), "nf4_sliced_on_every_rank": int(sliced), "nf4_changed": []}
    for name, b in bases.items():
        codes, qabsmax = b.codes.full_tensor(), b.qabsmax.full_tensor()
        if is_main:
            q = b.quantize(reader.get(name), name)
            if not (torch.equal(codes, q.codes) and torch.equal(qabsmax, q.qabsmax)):
                report["nf4_changed"].append(name)
    return report


def cut_back(work: Path, variant: str, name: str, d) -> None:
    """full/ copied to `name`/ as it was after step 3: its later checkpoint, final/ and records removed."""
    if d.is_main:
        src, dst = work / variant / "full", work / variant / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("final", "step_00000006", "*.lock", ".lock"))
        lines = (dst / "metrics.jsonl").read_text().splitlines()
        (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x).get("step", 0) <= 3))
    dist.barrier()


def changed_base(work: Path, variant: str, others: list[str], d) -> Path:
    """Another base: the next variant's (another config and file size), else this one with another norm_eps."""
    if others:
        return work / others[0] / "base"
    changed = work / variant / "changed_base"
    if d.is_main:
        shutil.copytree(work / variant / "base", changed)
        raw = json.loads((changed / "config.json").read_text())
        (changed / "config.json").write_text(json.dumps(raw | {"rms_norm_eps": 1e-5}))
    dist.barrier()
    return changed


def qlora_runs(work: Path, d) -> None:
    """The QLoRA variant: full/, resumed/ from step 3, and changed/ (the checkpoint resumed unquantized)."""
    s = train(qlora_config(work, "full"), d)
    check_frozen(s, work / "qlora" / "base", work / "qlora" / "frozen.json", d.is_main)
    del s
    cut_back(work, "qlora", "resumed", d)
    train(qlora_config(work, "resumed"), d)
    cut_back(work, "qlora", "changed", d)
    try:
        train(qlora_config(work, "changed", **{"lora.quantize": "none"}), d)
        message = "resumed without an error"
    except (UserError, ValueError) as e:
        message = str(e)
    if d.is_main:
        (work / "qlora" / "changed.txt").write_text(message)
    dist.barrier()


def main(work: Path, variants: list[str]) -> None:
    d = init_distributed()
    logging.basicConfig(level=logging.INFO if d.is_main else logging.WARNING, format="[c2a] %(message)s")
    if variants[-1] == "qlora":
        qlora_runs(work, d)
        variants = variants[:-1]
    if not variants:
        shutdown_and_exit(0)
    for i, variant in enumerate(variants):
        base = work / variant / "base"
        s = train(config(work, variant, "full", base), d)
        check_frozen(s, base, work / variant / "frozen.json", d.is_main)
        del s
        cut_back(work, variant, "resumed", d)
        train(config(work, variant, "resumed", base), d)
        cut_back(work, variant, "changed", d)
        other = changed_base(work, variant, variants[i + 1 :], d)
        try:
            train(config(work, variant, "changed", other), d)
            message = "resumed without an error"
        except (UserError, ValueError) as e:
            message = str(e)
        if d.is_main:
            (work / variant / "changed.txt").write_text(message)
        dist.barrier()
    train(config(work, variants[0], "val", work / variants[0] / "base", **VAL), d)
    stop_and_resume(work, variants[0], d)
    train(config(work, variants[0], "offload", work / variants[0] / "base", **{"train.cpu_offload": "true"}), d)
    # HSDP: the first variant again on a (2 replicas x 1 shard) mesh, to the end
    hsdp = init_distributed(replicas=2)
    train(config(work, variants[0], "hsdp", work / variants[0] / "base", **{"train.replicas": "2"}), hsdp)
    shutdown_and_exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
