"""Starting a run, or resuming it: the out_dir claimed, the data and validation set, the model config, the
checkpoint to resume from, the loader and schedule, and the sharded model with its optimizer, filled from the
checkpoint or the pretrained weights (or a seeded init). `Session` holds all of it for the loop."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from c2a.config import LlamaConfig, TrainConfig, config_to_toml
from c2a.data.batching import MicroBatchLoader
from c2a.model.adapter import AdapterSpec
from c2a.model.flops import lora_matmul_flops_per_token
from c2a.model.llama import Llama
from c2a.model.vocab import AddedRowsReader
from c2a.model.weights import CheckpointReader, with_tokenizer_ids
from c2a.train.auto_settings import resolve_run_settings
from c2a.train.checkpoint import load_checkpoint, remove_partial_checkpoints, resume_point
from c2a.train.errors import TrainingError
from c2a.train.lifecycle import claim_out_dir
from c2a.train.lora_run import base_digest, check_base, initial_adapter, lora_spec
from c2a.train.metrics import Counters
from c2a.train.optim import build_optimizer, build_scheduler, check_schedule, schedule_of
from c2a.train.parallel import Dist, build_sharded_model, materialize
from c2a.train.run_data import RunData, build_data, make_loader, step_rows
from c2a.train.tracking import Tracker, check_extras
from c2a.train.validation import Validation

log = logging.getLogger("c2a")


@dataclass
class Session:
    """A started run on this rank: everything the loop and the finish read, and the step it is at."""

    cfg: TrainConfig
    d: Dist
    data: RunData
    validation: Validation
    model_cfg: LlamaConfig
    loader: MicroBatchLoader
    schedule: dict[str, Any]
    model: Llama
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    counters: Counters
    step: int
    tracker: Tracker | None = None  # rank 0 with train.mlflow / train.wandb
    lora: AdapterSpec | None = None
    base: dict[str, Any] | None = None  # the frozen base's digest (LoRA), checked on resume

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def total_steps(self) -> int:
        return self.schedule["total_steps"]

    def lora_flops_per_token(self) -> int | None:
        """A LoRA run's matmul FLOPs per token (for MFU); None for full fine-tuning."""
        if self.lora is None:
            return None
        adapters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)  # DTensor: the full numel
        return lora_matmul_flops_per_token(self.model_cfg, adapters)

    def trainer_state(self, val_loss: float | None) -> dict[str, Any]:
        """What a checkpoint holds besides the tensors (trainer_state.json)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "counters": self.counters.__dict__,
            "schedule": self.schedule,
            "val_loss": val_loss,
        } | ({"base": self.base, "lora": dataclasses.asdict(self.lora)} if self.lora else {})


def claim(cfg: TrainConfig, d: Dist) -> None:
    """Collective, before anything is loaded: every rank refuses an unwritable out_dir or one another run holds,
    and what a crash left half-written is removed."""
    if (
        cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None
    ):  # before minutes of loading, not after
        raise TrainingError("train.tensorboard = true needs the tensorboard package: pip install tensorboard")
    check_extras(cfg)
    if cfg.train.optimizer == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        raise TrainingError("train.optimizer = \"adamw8bit\" needs torchao: pip install -e '.[adamw8bit]'")
    claim_out_dir(Path(cfg.out_dir), d)
    if d.is_main:
        remove_partial_checkpoints(Path(cfg.out_dir))
    dist.barrier()


def start(cfg: TrainConfig, d: Dist) -> Session | int:
    """Collective: the run ready at its first step (or its checkpoint's); the step it finished at, when the
    out_dir holds a finished run (its final/ written)."""
    out, t = Path(cfg.out_dir), cfg.train
    torch.manual_seed(t.seed)
    lora = lora_spec(cfg.lora)  # an init_adapter's config is read (and refused) before anything else
    data = build_data(cfg, d)
    validation, train_set = Validation.start(cfg, data, d)  # with data.val_fraction, the examples not held out
    data = data.with_train(train_set)
    reader = CheckpointReader(cfg.model.checkpoint) if cfg.model.checkpoint else None
    if reader is not None and cfg.model.add_pad_token:
        reader = AddedRowsReader(reader)  # vocab + 1, the new rows the mean of the others
    model_cfg = _model_config(cfg, reader, data)
    adapter = initial_adapter(cfg.lora, model_cfg) if lora else None  # checked against the base's shapes
    base = base_digest(cfg, model_cfg) if lora else None
    resume, saved = resume_point(out) or (None, None)  # the newest checkpoint that validates
    # the step's rows as train.micro_batch gives them (or as the checkpoint recorded); "auto" settings only
    # split them differently
    rows = saved["data"]["global_batch_rows"] if saved else step_rows(cfg, data.train, d.world_size)[0]
    configured, cfg = cfg, resolve_run_settings(cfg, model_cfg, d, data.train, rows, saved)
    t = cfg.train
    loader, batch_desc = make_loader(cfg, data.train, d, rows=rows)
    total_steps = loader.total_steps(t.epochs) if not t.max_steps else min(loader.total_steps(t.epochs), t.max_steps)
    schedule = schedule_of(cfg, total_steps)
    if saved is not None:
        check_schedule(resume, saved, schedule)
        check_base(resume, saved, base, lora)
        finished = saved["step"] >= total_steps or saved["counters"].get("early_stopped", False)
        if finished and (out / "final").is_dir():
            return saved["step"]
    if d.is_main:
        _write_config(out, configured)  # only now that the run is known to start; as given, "auto" unresolved

    model = build_sharded_model(model_cfg, t, d, lora, cfg.lora.quantize)
    optimizer = build_optimizer(model, cfg, d.device)
    s = Session(
        cfg,
        d,
        data,
        validation,
        model_cfg,
        loader,
        schedule,
        model,
        optimizer,
        build_scheduler(optimizer, schedule),
        Counters(),
        0,
        lora=lora,
        base=base,
    )
    if resume is not None and lora is not None:  # the checkpoint holds the adapters only: the base first
        materialize(model, reader, t.seed)
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer)
        s.step = state["step"]
        s.scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["data"])
        s.counters = Counters(**state["counters"])
        log.info("resumed from %s (step %d of %d, saved by %d ranks)", resume, s.step, total_steps, state["world_size"])
    else:
        materialize(model, reader, t.seed, adapter)
    if d.is_main and (t.mlflow or t.wandb):
        s.tracker = Tracker(cfg)  # the run ids of a resumed run come from out_dir/tracking.json
    origin = (
        f"resumed from {resume.name}"
        if resume is not None
        else f"pretrained {reader.path}"
        if reader
        else "random init"
    )
    _log_start(s, origin, batch_desc)
    return s


def _model_config(cfg: TrainConfig, reader: CheckpointReader | None, data: RunData) -> LlamaConfig:
    """The checkpoint's model config (or the preset's), with the special-token ids final/config.json names."""
    model_cfg = reader.config if reader else LlamaConfig.from_name(cfg.model.preset)
    if reader is None and cfg.model.add_pad_token:  # from scratch: one more randomly initialised row
        model_cfg = model_cfg.replace(vocab_size=model_cfg.vocab_size + 1)
    model_cfg = _special_ids(model_cfg, reader, data)
    if data.tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainingError(
            f"tokenizer {data.tokenizer_path} has {data.tokenizer.vocab_size} pieces but the model's vocab_size is {model_cfg.vocab_size}"
        )
    if cfg.data.max_len > model_cfg.max_seq_len:
        log.warning(
            "data.max_len %d exceeds the model's max_seq_len %d: rotary positions beyond it were never trained",
            cfg.data.max_len,
            model_cfg.max_seq_len,
        )
    return model_cfg


def _log_start(s: Session, origin: str, batch_desc: str) -> None:
    t, m = s.cfg.train, s.model_cfg
    log.info("model: %s, %.1fM parameters; %s", _model_desc(s.cfg, m), m.num_params / 1e6, origin)
    if s.lora is not None:
        trained = sum(p.numel() for p in s.model.parameters() if p.requires_grad)  # DTensor numel: the full tensor's
        log.info(
            "LoRA: rank %d, alpha %g%s, on %s; %.2fM parameters trained, the rest frozen%s",
            s.lora.rank, s.lora.alpha, " (rslora)" if s.lora.rslora else "", ",".join(s.lora.targets), trained / 1e6,
            " (the adapted linears' base in NF4: QLoRA)" if s.cfg.lora.quantize == "nf4" else "",
        )  # fmt: skip
    log.info("data: %d examples, %s", s.loader.num_examples, batch_desc)
    log.info(
        "schedule: %d optimizer steps (%d epochs x %d steps%s), warmup %d, cosine to %g x lr %g",
        s.total_steps,
        t.epochs,
        s.loader.steps_in_epoch(0),
        f", capped by max_steps={t.max_steps}" if t.max_steps else "",
        s.schedule["warmup_steps"],
        t.min_lr_ratio,
        t.lr,
    )


def _special_ids(model_cfg: LlamaConfig, reader: CheckpointReader | None, data: RunData) -> LlamaConfig:
    """The checkpoint's config.json ids, the tokenizer's where it names none (with_tokenizer_ids); a warning
    when the EOS every example ends with is not one transformers' generate would stop at."""
    tok = data.tokenizer
    model_cfg = with_tokenizer_ids(model_cfg, reader.named_ids if reader else frozenset(), tok.bos_id, tok.eos_id)
    eos = model_cfg.eos_token_id
    stops = list(eos) if isinstance(eos, tuple) else [eos]
    if tok.eos_id not in stops:
        log.warning(
            "the tokenizer's EOS %d (%r) ends every training example, but the checkpoint's config.json names eos_token_id %s: "
            "final/config.json keeps the checkpoint's, so transformers' generate will not stop at %d",
            tok.eos_id,
            tok.eos_token,
            stops[0] if len(stops) == 1 else stops,
            tok.eos_id,
        )
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
        old = set(path.read_text().splitlines())
        changed = [line for line in text.splitlines() if line not in old and "=" in line]
        n = 1
        while (out / f"config.{n}.toml").exists():
            n += 1
        os.rename(path, out / f"config.{n}.toml")
        log.warning(
            "config differs from the one %s was last started with (kept as config.%d.toml); now: %s",
            out,
            n,
            "; ".join(changed),
        )
    path.write_text(text)
