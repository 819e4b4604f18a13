"""The training run: data, sharded model, optimizer and schedule, the loop, checkpoints, export, demo eval.

One optimizer step (`train_step`) is: this rank's micro-batches for the step, the global count of trained
targets (all-reduced), forward/backward of each micro-batch with the loss divided by that global count
(so loss and gradients do not depend on how the global batch is split over ranks and accumulation),
clipping on the global norm, then the optimizer step unless the loss or gradient is non-finite.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from c2a.config import LlamaConfig, TrainConfig, config_to_toml
from c2a.data import Tokenizer, TokenizedDataset, chat, load_records
from c2a.data.tokenizer import CHAT_TEMPLATE_FILE, export_tokenizer, find_tokenizer
from c2a.data.batching import MicroBatch, MicroBatchLoader
from c2a.model.llama import Llama
from c2a.model.weights import CheckpointReader, save_hf, with_tokenizer_ids
from c2a.plan import predicted_peak_mb
from c2a.train.checkpoint import load_checkpoint, remove_partial_checkpoints, resume_point, save_checkpoint
from c2a.train.lifecycle import RunStopped, StopControl, claim_out_dir
from c2a.train.metrics import MetricsWriter, attention_flops, matmul_flops_per_token, peak_flops, progress_bar
from c2a.train.parallel import Dist, build_sharded_model, compute_dtype, full_parameters, materialize
from c2a.train.validation import Validation

log = logging.getLogger("c2a")


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to change."""


# ------------------------------------------------------------------------------------------------ data


@dataclass
class RunData:
    tokenizer_path: Path
    tokenizer: Tokenizer
    train: TokenizedDataset
    heldout: list[dict[str, str]] | None  # the demo task's held-out records (for exact match)


def resolve_tokenizer(cfg: TrainConfig) -> Path:
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
    elif cfg.data.path == "demo":
        from c2a.data.demo import DEMO_TOKENIZER

        path = DEMO_TOKENIZER
    elif cfg.model.checkpoint and find_tokenizer(cfg.model.checkpoint) is not None:
        path = find_tokenizer(cfg.model.checkpoint)  # tokenizer.model, else tokenizer.json
    else:
        raise TrainingError("no tokenizer: set data.tokenizer to a SentencePiece tokenizer.model or an HF tokenizer.json "
                            "(the model's own: Llama-2's tokenizer.model for Llama-2 weights)")
    if not path.is_file():
        raise TrainingError(f"data.tokenizer: {path} does not exist")
    return path


def build_data(cfg: TrainConfig, d: Dist) -> RunData:
    """The tokenized training set: the demo task (in memory), a prepared cache directory, or a data file /
    hub dataset tokenized once by rank 0 into out_dir/data_cache and memory-mapped by every rank."""
    tok_path = resolve_tokenizer(cfg)
    tokenizer = Tokenizer(tok_path)
    max_len = cfg.data.max_len
    if cfg.data.path == "demo":
        from c2a.data.demo import demo_split

        records, heldout = demo_split(cfg.data.demo_train_size, cfg.data.demo_heldout_size)
        ds = TokenizedDataset.from_records(records, tokenizer, max_len, truncation=cfg.data.truncation, source={"kind": "demo"})
        return RunData(tok_path, tokenizer, _report_lengths(ds, cfg), heldout)
    source = Path(cfg.data.path)
    if source.is_dir():
        ds = TokenizedDataset.open(source, expect_tokenizer=tokenizer, expect_max_len=max_len)
        return RunData(tok_path, tokenizer, _report_lengths(ds, cfg), None)
    cache = Path(cfg.out_dir) / "data_cache"
    if d.is_main and not cache.is_dir():
        log.info("tokenizing %s into %s", cfg.data.path, cache)
        loaded = load_records(cfg.data.path, skip_bad_rows=cfg.data.skip_bad_rows, skip_hint="--data.skip_bad_rows=true")
        workers = cfg.data.workers or os.cpu_count() or 1
        ds = TokenizedDataset.from_records(loaded.records, tokenizer, max_len, truncation=cfg.data.truncation, workers=workers,
                                           source=loaded.source, skipped_bad_rows=len(loaded.skipped), template=cfg.data.template)  # fmt: skip
        ds.save(cache)
    dist.barrier()
    hint = (f"{cache} is this run's own cache, made when it started: resume with the data and settings it was started with "
            f"(see {Path(cfg.out_dir) / 'config.toml'}), or train in a new out_dir")  # fmt: skip
    ds = TokenizedDataset.open(cache, expect_tokenizer=tokenizer, expect_max_len=max_len, expect_source=cfg.data.path,
                               expect_truncation=cfg.data.truncation, expect_template=cfg.data.template, hint=hint)  # fmt: skip
    return RunData(tok_path, tokenizer, _report_lengths(ds, cfg), None)


def _report_lengths(ds: TokenizedDataset, cfg: TrainConfig) -> TokenizedDataset:
    """Logs how many examples did not fit data.max_len (truncated or dropped): never silent."""
    counts = ds.manifest["counts"]
    if counts["truncated"] or counts["dropped"]:
        if counts["truncated"]:
            what, instead = f"{counts['truncated']:,} truncated", "data.truncation=drop leaves them out"
        else:
            what, instead = f"{counts['dropped']:,} dropped", "data.truncation=truncate keeps them, shortened"
        log.warning("data: %s of %s examples longer than data.max_len=%d (%s)",
                    what, f"{counts['records'] - counts['skipped_bad_rows']:,}", cfg.data.max_len, instead)  # fmt: skip
    return ds


def make_loader(cfg: TrainConfig, dataset: TokenizedDataset, d: Dist, rows: int | None = None) -> tuple[MicroBatchLoader, str]:
    """The micro-batch loader and a line describing the batch.

    `train.global_batch` counts examples, as the model card does. Padded, a step is that many rows;
    packed, it is the nearest whole number of (micro-batch x ranks) rows that holds about as many examples.
    `rows` (from a checkpoint) fixes the rows per step instead, so a run resumes with the same steps on
    any number of ranks that divides them.
    """
    t = cfg.train
    unit = t.micro_batch * d.world_size
    mode = "packed" if cfg.data.packing else "padded"
    examples_per_row = 1.0
    if mode == "packed":
        probe = MicroBatchLoader(dataset, seq_len=cfg.data.max_len, micro_batch_size=1, global_batch_rows=1, mode="packed", seed=t.seed)
        examples_per_row = probe.num_examples / probe.rows_in_epoch(0)
    if rows is None:
        rows = t.global_batch if mode == "padded" else max(1, round(t.global_batch / examples_per_row / unit)) * unit
    if rows % unit:
        what = f"{'the checkpoint' if rows != t.global_batch else 'train.global_batch'}'s {rows} {'rows' if mode == 'packed' else 'examples'} per step"
        fits = [m for m in range(1, t.micro_batch + 1) if rows % (m * d.world_size) == 0]
        hint = f"; use --train.micro_batch={fits[-1]}" if fits else f"; no micro-batch size divides it on {d.world_size} ranks"
        raise TrainingError(f"{what} must be a multiple of train.micro_batch ({t.micro_batch}) x ranks ({d.world_size}){hint}")
    loader = MicroBatchLoader(dataset, seq_len=cfg.data.max_len, micro_batch_size=t.micro_batch, global_batch_rows=rows,
                              mode=mode, rank=d.rank, world_size=d.world_size, seed=t.seed)  # fmt: skip
    split = f"micro-batch {t.micro_batch} x accumulation {loader.accum_steps} x {d.world_size} ranks"
    if mode == "padded":
        return loader, f"global batch {rows} examples = {split} (padded to the longest in each micro-batch)"
    # padding of the epoch's steps: the packed rows' unfilled ends, and the empty rows that complete its last step
    filled = (1.0 - loader.padding_fraction(0)) * loader.rows_in_epoch(0) / (loader.steps_in_epoch(0) * rows)
    return loader, (f"global batch {t.global_batch} examples -> {rows} packed rows of {cfg.data.max_len} tokens "
                    f"(~{rows * examples_per_row:.1f} examples, padding {1.0 - filled:.2%}) = {split}")


# --------------------------------------------------------------------------------- optimizer, schedule


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    t = cfg.train
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norm weights
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters on CUDA; foreach (the CPU default) otherwise
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=device.type == "cuda")


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier for optimizer step s (0-based): linear warmup to 1 over `warmup_steps` steps (the first
    step already gets 1/warmup, not 0), then cosine decay to `min_ratio` at the last step."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps - 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ------------------------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    loss: torch.Tensor  # global mean loss of the step (0-dim, on device)
    grad_norm: torch.Tensor
    targets: torch.Tensor  # global count of trained targets
    tokens: int  # this rank's non-padding tokens
    positions: int  # this rank's positions (padding included)
    attn_sq: int  # this rank's sum over documents of length^2 (for the attention FLOP count)
    finite: bool
    stop: bool = False  # some rank was asked to stop (SIGTERM/SIGINT): every rank stops after this step
    save_due: bool = False  # a timed checkpoint is due (rank 0's clock)


def forward_backward(
    model: Llama, batches: list[MicroBatch], device: torch.device, flags: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulates the gradients of one optimizer step's micro-batches on this rank. Returns (the global
    mean loss, the global count of trained targets), both already all-reduced, as 0-dim device tensors.
    `flags` (a small float tensor, e.g. StopControl's) is summed over ranks in place by the same
    all-reduce as the loss, at the end of the step, so agreeing on it costs no extra collective."""
    batches = [b.to(device, non_blocking=True) for b in batches]
    targets = sum((b.labels != -100).sum() for b in batches)
    dist.all_reduce(targets)  # the global count of trained targets: every rank divides by it
    normalizer = targets.clamp(min=1).float()
    loss_sum = torch.zeros((), device=device)
    for b in batches:
        loss = model.loss(b.input_ids, b.labels, position_ids=b.position_ids, normalizer=normalizer, num_trained=b.num_trained)
        loss.backward()
        loss_sum += loss.detach()
    if flags is None:
        dist.all_reduce(loss_sum)
        return loss_sum, targets
    reduced = torch.cat([loss_sum.view(1), flags.to(device, loss_sum.dtype)])
    dist.all_reduce(reduced)
    flags.copy_(reduced[1:])
    return reduced[0], targets


def train_step(model: Llama, optimizer: torch.optim.Optimizer, batches: list[MicroBatch], grad_clip: float, device: torch.device,
               control: StopControl | None = None) -> StepResult:  # fmt: skip
    flags = control.local_flags(device) if control is not None else torch.zeros(2, device=device)
    loss, targets = forward_backward(model, batches, device, flags)
    params = [p for p in model.parameters() if p.grad is not None]
    # clip_grad_norm_ reduces the norm over every shard (DTensor) of every rank: the global norm
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    # the one host sync of a step: a non-finite loss or gradient must skip the update, and a step without
    # any trained target has nothing to learn from (Adam's momentum alone would still move the weights)
    # (the stop / timed-save flags ride along: they were summed over ranks with the loss)
    finite, has_targets, stop, save_due = torch.cat([torch.stack([torch.isfinite(loss) & torch.isfinite(grad_norm), targets > 0]), flags > 0]).tolist()
    if finite and has_targets:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b.num_tokens for b in batches)
    positions = sum(b.input_ids.numel() for b in batches)
    attn_sq = sum(b.sum_len_sq for b in batches)
    return StepResult(loss, grad_norm, targets, tokens, positions, attn_sq, finite, stop, save_due)


# ------------------------------------------------------------------------------------------ the run


@dataclass
class Counters:
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    trained_tokens: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    demo_before: dict[str, Any] | None = None


def run(cfg: TrainConfig, d: Dist) -> dict[str, Any]:
    """The whole run on every rank; returns the summary (rank 0 fills it)."""
    run_start = time.perf_counter()
    out = Path(cfg.out_dir)
    t = cfg.train
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:  # before minutes of loading, not after
        raise TrainingError("train.tensorboard = true needs the tensorboard package: pip install tensorboard")
    claim_out_dir(out, d)  # collective: every rank refuses an unwritable out_dir or one another run holds
    if d.is_main:
        remove_partial_checkpoints(out)
    dist.barrier()
    torch.manual_seed(t.seed)

    data = build_data(cfg, d)
    validation = Validation.start(cfg, data, d)  # with data.val_fraction, takes its examples out of data.train
    reader = CheckpointReader(cfg.model.checkpoint) if cfg.model.checkpoint else None
    model_cfg = reader.config if reader else LlamaConfig.from_name(cfg.model.preset)
    model_cfg = _special_ids(model_cfg, reader, data)  # what final/config.json names as BOS / EOS
    if data.tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainingError(f"tokenizer {data.tokenizer_path} has {data.tokenizer.vocab_size} pieces but the model's vocab_size is {model_cfg.vocab_size}")
    if cfg.data.max_len > model_cfg.max_seq_len:
        log.warning("data.max_len %d exceeds the model's max_seq_len %d: rotary positions beyond it were never trained", cfg.data.max_len, model_cfg.max_seq_len)
    resume, saved = resume_point(out) or (None, None)  # the newest checkpoint that validates
    loader, batch_desc = make_loader(cfg, data.train, d, rows=saved["data"]["global_batch_rows"] if saved else None)
    total_steps = loader.total_steps(t.epochs)
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    warmup = math.ceil(t.warmup_ratio * total_steps)
    schedule = {"total_steps": total_steps, "warmup_steps": warmup, "lr": t.lr, "min_lr_ratio": t.min_lr_ratio}
    if saved is not None:
        _check_schedule(resume, saved, schedule)
        if saved["step"] >= total_steps and (out / "final").is_dir():
            log.info("already finished at step %d; the final model is in %s (train more from it in a new out_dir "
                     "with --model.checkpoint=%s)", saved["step"], out / "final", out / "final")  # fmt: skip
            return {"already_finished": saved["step"], "out_dir": str(out)}
    if d.is_main:
        _write_config(out, cfg)  # only now that the run is known to start

    model = build_sharded_model(model_cfg, t, d)
    optimizer = build_optimizer(model, cfg, d.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup, t.min_lr_ratio))
    counters = Counters()
    step = 0
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer)
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["data"])
        counters = Counters(**state["counters"])
        log.info("resumed from %s (step %d of %d, saved by %d ranks)", resume, step, total_steps, state["world_size"])
    else:
        materialize(model, reader, t.seed)

    origin = f"resumed from {resume.name}" if resume is not None else f"pretrained {reader.path}" if reader else "random init"
    log.info("model: %s, %.1fM parameters; %s", _model_desc(cfg, model_cfg), model_cfg.num_params / 1e6, origin)
    log.info("data: %d examples, %s", loader.num_examples, batch_desc)
    log.info("schedule: %d optimizer steps (%d epochs x %d steps%s), warmup %d, cosine to %g x lr %g",
             total_steps, t.epochs, loader.steps_in_epoch(0), f", capped by max_steps={t.max_steps}" if t.max_steps else "",
             warmup, t.min_lr_ratio, t.lr)  # fmt: skip

    demo = data.heldout is not None and cfg.eval.demo_accuracy
    if demo and counters.demo_before is None:
        counters.demo_before = evaluate_demo(model, model_cfg, data, cfg, d, "before training")

    writer = MetricsWriter(out, t.tensorboard, after_step=step) if d.is_main else None
    bar = progress_bar(total_steps, step, t.progress and d.is_main)
    peak = peak_flops(d.device)
    flops_per_token = matmul_flops_per_token(model_cfg)
    predicted_peak = predicted_peak_mb(cfg, model_cfg, d.world_size, d.device, loader)
    window: list[StepResult] = []
    control = StopControl(t.save_every_minutes, d.is_main)
    control.install()
    window_start = time.perf_counter()
    model.train()
    batches = iter(())
    while step < total_steps:
        epoch = loader.epoch + 1  # 1-based; read before the step's first micro-batch moves the loader
        micro = []
        while len(micro) < loader.accum_steps:
            b = next(batches, None)
            if b is None:
                batches = iter(loader)  # the next epoch (or the rest of the current one after a resume)
                continue
            micro.append(b)
        result = train_step(model, optimizer, micro, t.grad_clip, d.device, control)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        counters.bad_in_a_row = 0 if result.finite else counters.bad_in_a_row + 1
        counters.skipped_steps += not result.finite
        window.append(result)
        if bar is not None:
            bar.update(1)
        if not result.finite:
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped (%d in a row)",
                        step, result.loss.item(), result.grad_norm.item(), counters.bad_in_a_row)  # fmt: skip
        stop = counters.bad_in_a_row >= t.max_bad_steps
        val = validation.after_step(model, step, total_steps)  # collective at eval.every steps and the last: val_loss, val_ppl
        saving = (step == total_steps or stop or result.stop or result.save_due or (t.save_every and step % t.save_every == 0)
                  or validation.new_best)  # fmt: skip
        # a checkpoint (and a validation) is also a logging point: its counters then hold every step it covers
        if step % t.log_every == 0 or saving or val:
            elapsed = time.perf_counter() - window_start - val.get("val_seconds", 0.0)  # validating is not training time
            record = {**_metrics(window, elapsed, step, epoch, lr, d, flops_per_token, model_cfg, peak, counters), **val}
            record["predicted_peak_memory_mb"] = predicted_peak  # c2a.plan's, beside peak_memory_mb
            counters.train_seconds += elapsed
            if writer is not None:
                writer.write(record)
                if bar is not None and record["loss"] is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", **validation.postfix())
            window, window_start = [], time.perf_counter()
        if saving:
            state = {"scheduler": scheduler.state_dict(), "data": loader.state_dict(), "counters": counters.__dict__, "schedule": schedule,
                     "val_loss": val.get("val_loss")}  # fmt: skip
            path = save_checkpoint(out, step, model, optimizer, state, t.keep_last, t.keep_best)
            log.info("saved checkpoint %s", path)
            control.saved()
            window_start = time.perf_counter()  # the save is not training time
            if result.stop and step < total_steps:
                raise RunStopped(step, path)
        if stop:
            raise TrainingError(f"{counters.bad_in_a_row} non-finite steps in a row (train.max_bad_steps={t.max_bad_steps}); "
                                f"stopped at step {step} with a checkpoint in {out / 'checkpoints'}; lower train.lr or check the data")  # fmt: skip
    control.uninstall()  # from here on (export, evaluation) a signal interrupts as usual
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()

    final = export_final(model, model_cfg, data.tokenizer_path, out, compute_dtype(t.dtype, d.device), d,
                         trained_template(data, cfg.data.template) if d.is_main else None)  # fmt: skip
    summary: dict[str, Any] = {"steps": step, "out_dir": str(out), "final": str(final), "train_seconds": counters.train_seconds,
                               "tokens": counters.tokens, "trained_tokens": counters.trained_tokens,
                               "skipped_steps": counters.skipped_steps, "wall_seconds": time.perf_counter() - run_start}  # fmt: skip
    last = _last_metrics(out) if d.is_main else None
    if last is not None and last["loss"] is not None:
        summary["final_loss"] = last["loss"]
    if demo:
        summary["demo_before"] = counters.demo_before
        summary["demo_after"] = evaluate_demo(model, model_cfg, data, cfg, d, "after training")
    summary.update(validation.finish(summary))  # rank 0: the validation numbers; the demo's exact match into metrics.jsonl
    return summary


def _special_ids(model_cfg: LlamaConfig, reader: CheckpointReader | None, data: RunData) -> LlamaConfig:
    """The checkpoint's config.json ids, the tokenizer's where it names none (with_tokenizer_ids); a warning
    when the EOS every example ends with is not one transformers' generate would stop at."""
    tok = data.tokenizer
    model_cfg = with_tokenizer_ids(model_cfg, reader.named_ids if reader else frozenset(), tok.bos_id, tok.eos_id)
    eos = model_cfg.eos_token_id
    stops = list(eos) if isinstance(eos, tuple) else [eos]
    if tok.eos_id not in stops:
        log.warning("the tokenizer's EOS %d (%r) ends every training example, but the checkpoint's config.json names eos_token_id %s: "
                    "final/config.json keeps the checkpoint's, so transformers' generate will not stop at %d",
                    tok.eos_id, tok.eos_token, stops[0] if len(stops) == 1 else stops, tok.eos_id)  # fmt: skip
    return model_cfg


def _model_desc(cfg: TrainConfig, m: LlamaConfig) -> str:
    name = cfg.model.checkpoint or cfg.model.preset
    return f"{name} (dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads / {m.n_kv_heads} kv, ffn {m.ffn_hidden_dim}, vocab {m.vocab_size})"


def _write_config(out: Path, cfg: TrainConfig) -> None:
    """out_dir/config.toml is the config of the latest start; one that differs from it moves the old one to
    config.N.toml (N = 1, 2, ...), so a resumed run with changed settings keeps its history."""
    path = out / "config.toml"
    text = config_to_toml(cfg)
    if path.is_file() and path.read_text() != text:
        old = {line for line in path.read_text().splitlines()}
        changed = [line for line in text.splitlines() if line not in old and "=" in line]
        n = 1
        while (out / f"config.{n}.toml").exists():
            n += 1
        os.rename(path, out / f"config.{n}.toml")
        log.warning("config differs from the one %s was last started with (kept as config.%d.toml); now: %s", out, n, "; ".join(changed))
    path.write_text(text)


def _check_schedule(resume: Path, saved: dict[str, Any], schedule: dict[str, Any]) -> None:
    """A resumed run must continue the learning-rate schedule it was on: a changed number of steps, warmup,
    lr or final ratio would restart the cosine partway down (the lr jumps), so it is refused, not guessed."""
    before = saved.get("schedule")  # absent in checkpoints written before the schedule was recorded
    if before is None or before == schedule:
        return
    diff = ", ".join(f"{k} {before[k]} -> {schedule[k]}" for k in schedule if before.get(k) != schedule[k])
    raise TrainingError(f"{resume} was trained on another learning-rate schedule ({diff}); resuming would make the lr jump. "
                        f"Resume with the settings in {resume.parent.parent / 'config.toml'}, or train on from "
                        f"{resume.parent.parent / 'final'} (or a checkpoint exported with c2a.model.convert) in a new out_dir "
                        "with --model.checkpoint")  # fmt: skip


def _metrics(window: list[StepResult], seconds: float, step: int, epoch: int, lr: float, d: Dist, flops_per_token: int,
             model_cfg: LlamaConfig, peak: float | None, counters: Counters) -> dict[str, Any]:  # fmt: skip
    """Collective: sums this window's counts over ranks. The .item() calls here are the logging sync."""
    local = torch.tensor([sum(r.tokens for r in window), sum(r.positions for r in window), sum(r.attn_sq for r in window),
                          _peak_memory_mb(d.device)], dtype=torch.float64, device=d.device)  # fmt: skip
    summed = local[:3].clone()
    dist.all_reduce(summed)
    peak_mb = local[3:].clone()
    dist.all_reduce(peak_mb, op=dist.ReduceOp.MAX)
    tokens, positions, attn_sq = (float(x) for x in summed.tolist())
    targets = float(sum(r.targets for r in window))
    # token-weighted over the window's applied steps; a skipped (non-finite) step is counted in skipped_steps,
    # and a window without any trained target (all labels -100) has no loss: null, not a perfect-looking 0
    applied = [r for r in window if r.finite]
    applied_targets = float(sum(r.targets for r in applied))
    loss = float(sum(r.loss * r.targets for r in applied)) / applied_targets if applied_targets else None
    counters.trained_tokens += int(targets)
    counters.tokens += int(tokens)
    record = {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": float(window[-1].grad_norm),
        "tokens_per_s": targets / seconds,
        "all_tokens_per_s": tokens / seconds,
        "padding_fraction": 1.0 - tokens / positions,
        "peak_memory_mb": float(peak_mb),
        "step_seconds": seconds / len(window),
        "skipped_steps": counters.skipped_steps,
    }
    if peak is not None:
        flops = tokens * flops_per_token + attention_flops(model_cfg, int(attn_sq))
        record["mfu"] = flops / seconds / (peak * d.world_size)
    return record


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _last_metrics(out: Path) -> dict[str, Any] | None:
    import json

    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = path.read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines else None


# ----------------------------------------------------------------------------- export and evaluation


def gather_model(model: Llama, model_cfg: LlamaConfig, dtype: torch.dtype, device: torch.device) -> Llama | None:
    """Collective: an unsharded copy of the model on rank 0's `device` (None elsewhere)."""
    copy = None
    if dist.get_rank() == 0:
        with torch.device("meta"):
            copy = Llama(model_cfg)
        copy = copy.to(dtype).to_empty(device=device)
    params = dict(copy.named_parameters()) if copy is not None else {}
    with torch.no_grad():
        for name, full in full_parameters(model, dtype):
            if copy is not None:
                params[name].copy_(full)
    return copy


def trained_template(data: RunData, template: str) -> str | None:
    """The Jinja source of the prompt format the run trained with: the chat template its chat records were
    rendered with (a run mixing both kinds counts as chat), else Alpaca's (`chat.ALPACA_TEMPLATE`: Alpaca
    records only, the demo). None, with a warning, when a prepared cache's recorded template is not what
    data.template resolves to here (the cache records its sha256, not its text)."""
    recorded = data.train.manifest.get("chat_template")
    if recorded is None:
        return chat.ALPACA_TEMPLATE
    try:
        label, source = chat.resolve_template(template, data.tokenizer)
    except chat.ChatTemplateError as e:
        log.warning("final/ gets no %s: %s", CHAT_TEMPLATE_FILE, e)
        return None
    if chat.template_sha256(source) != recorded["sha256"]:
        log.warning("final/ gets no %s: the data's chat records were rendered with %s, but data.template=%s is %s",
                    CHAT_TEMPLATE_FILE, recorded["name"], template, label)  # fmt: skip
        return None
    return source


def export_final(model: Llama, model_cfg: LlamaConfig, tokenizer_path: Path, out: Path, dtype: torch.dtype, d: Dist,
                 chat_template: str | None = None) -> Path:  # fmt: skip
    """Collective: out_dir/final/ as an HF directory (safetensors, config.json, the tokenizer's files), written
    beside it and renamed into place, streaming one parameter at a time through rank 0. `chat_template` (the
    one the run trained with, `trained_template`) goes into final/chat_template.jinja, where transformers'
    apply_chat_template and `python -m c2a.generate --template auto` find it before tokenizer_config.json's."""
    final, tmp = out / "final", out / "final.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    tensors = full_parameters(model, dtype)
    if d.is_main:
        save_hf(model_cfg, tensors, tmp)
        export_tokenizer(tokenizer_path, tmp)  # tokenizer.model, or tokenizer.json with its config files
        if chat_template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    else:
        for _ in tensors:  # take part in every gather
            pass
    dist.barrier()
    return final


def evaluate_demo(model: Llama, model_cfg: LlamaConfig, data: RunData, cfg: TrainConfig, d: Dist, when: str) -> dict[str, Any] | None:
    """Collective: greedy exact match on the demo's held-out split (as `python -m c2a.eval --data demo`
    computes it), run on rank 0 with a gathered copy of the model on its training device: fp32 on a CPU, the
    run's compute dtype on a GPU (bf16 by default, as c2a.eval's default there). A CPU copy of a GPU run's
    model would generate on the CPU, and under C2A_KERNELS=triton fail there (seen on an H200, 2026-12-04)."""
    from c2a.eval import answers, demo_exact_match

    dtype = torch.float32 if d.device.type == "cpu" else compute_dtype(cfg.train.dtype, d.device)
    copy = gather_model(model, model_cfg, dtype, d.device)
    result = None
    if copy is not None:
        start = time.perf_counter()
        records = data.heldout[: cfg.eval.max_examples]
        result = demo_exact_match(records, answers(copy.eval(), data.tokenizer, records, cfg.eval.max_new_tokens, batch_size=128))
        result["seconds"] = time.perf_counter() - start
        log.info("demo held-out exact match %s: %.1f%% of %d (%.1f s)", when, 100 * result["accuracy"], result["examples"], result["seconds"])
    dist.barrier()
    return result
