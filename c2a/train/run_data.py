"""The run's data: its tokenizer, the tokenized training set (the demo task in memory, a prepared cache, or a
data file tokenized once by rank 0 into out_dir/data_cache), and the loader that cuts it into optimizer steps."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from c2a.config import TrainConfig
from c2a.data import TokenizedDataset, Tokenizer
from c2a.data.batching import ExampleDataset, MicroBatchLoader
from c2a.data.cache import alpaca_encoding
from c2a.data.mix import MixedDataset
from c2a.data.sources import demo_dataset, resolve_tokenizer, tokenize_records_file
from c2a.train.errors import TrainingError
from c2a.train.parallel import Dist

log = logging.getLogger("c2a")


@dataclass(frozen=True)
class RunData:
    tokenizer_path: Path
    tokenizer: Tokenizer
    train: ExampleDataset  # a TokenizedDataset, or the part of one that validation does not hold out
    heldout: list[dict[str, str]] | None  # the demo task's held-out records (for exact match)

    def with_train(self, train: ExampleDataset) -> RunData:
        return dataclasses.replace(self, train=train)


def build_data(cfg: TrainConfig, d: Dist) -> RunData:
    """The tokenized training set: the demo task (in memory), a prepared cache directory, or a data file /
    hub dataset tokenized once by rank 0 into out_dir/data_cache and memory-mapped by every rank; with
    [[data.mix]], each source so (its own cache out_dir/mix_cache/K), mixed by weight."""
    tok_path = resolve_tokenizer(cfg)
    tokenizer = Tokenizer(tok_path)
    if cfg.data.is_demo:
        ds, heldout = demo_dataset(cfg, tokenizer)
        return RunData(tok_path, tokenizer, _report_lengths(ds, cfg), heldout)
    if not cfg.data.mix:
        ds = _source(cfg, d, tokenizer, cfg.data.path, cfg.data.template, Path(cfg.out_dir) / "data_cache")
        return RunData(tok_path, tokenizer, _report_lengths(ds, cfg), None)
    sources = [
        _source(cfg, d, tokenizer, m.path, m.template or cfg.data.template, Path(cfg.out_dir) / "mix_cache" / str(k))
        for k, m in enumerate(cfg.data.mix)
    ]
    mixed = MixedDataset(
        sources, [m.path for m in cfg.data.mix], [m.weight for m in cfg.data.mix], cfg.train.seed, cfg.data.val_fraction
    )
    if len(mixed) == 0:
        raise TrainingError("[[data.mix]]: the weights leave no training example; raise a weight")
    per_epoch = ", ".join(f"{name} {n:,}" for name, n in mixed.per_epoch().items())
    log.info("data mix: %d sources, examples per epoch: %s", len(sources), per_epoch)
    return RunData(tok_path, tokenizer, _report_lengths(mixed, cfg), None)


def _source(cfg: TrainConfig, d: Dist, tokenizer: Tokenizer, path: str, template: str, cache: Path) -> TokenizedDataset:
    """One source: a prepared cache opened as it is, or a data file / hub dataset tokenized once by rank 0 into
    `cache` and memory-mapped by every rank."""
    encoding = alpaca_encoding(template, cfg.data.tokenization)
    if Path(path).is_dir():
        return TokenizedDataset.open(
            path, expect_tokenizer=tokenizer, expect_max_len=cfg.data.max_len, expect_encoding=encoding
        )
    if d.is_main and not cache.is_dir():
        log.info("tokenizing %s into %s", path, cache)
        workers = cfg.data.workers or os.cpu_count() or 1
        tokenize_records_file(cfg, tokenizer, workers, path=path, template=template).save(cache)
    dist.barrier()
    hint = (
        f"{cache} is this run's own cache, made when it started: resume with the data and settings it was started with "
        f"(see {Path(cfg.out_dir) / 'config.toml'}), or train in a new out_dir"
    )
    return TokenizedDataset.open(
        cache,
        expect_tokenizer=tokenizer,
        expect_max_len=cfg.data.max_len,
        expect_source=path,
        expect_truncation=cfg.data.truncation,
        expect_template=template,
        expect_encoding=encoding,
        hint=hint,
    )


def _report_lengths(ds: ExampleDataset, cfg: TrainConfig) -> ExampleDataset:
    """Logs how many examples did not fit data.max_len (truncated or dropped): never silent."""
    counts = ds.manifest["counts"]
    if counts["truncated"] or counts["dropped"]:
        if counts["truncated"]:
            what, instead = f"{counts['truncated']:,} truncated", "data.truncation=drop leaves them out"
        else:
            what, instead = f"{counts['dropped']:,} dropped", "data.truncation=truncate keeps them, shortened"
        log.warning(
            "data: %s of %s examples longer than data.max_len=%d (%s)",
            what,
            f"{counts['records'] - counts['skipped_bad_rows']:,}",
            cfg.data.max_len,
            instead,
        )
    return ds


def step_rows(cfg: TrainConfig, dataset: ExampleDataset, world_size: int) -> tuple[int, float]:
    """The rows of an optimizer step, and the examples a row holds on average (1 padded).

    `train.global_batch` counts examples, as the model card does. Padded, a step is that many rows; packed,
    it is the nearest whole number of (micro-batch x ranks) rows that holds about as many examples."""
    t = cfg.train
    if not cfg.data.packing:
        return t.global_batch, 1.0
    probe = MicroBatchLoader(
        dataset, seq_len=cfg.data.max_len, micro_batch_size=1, global_batch_rows=1, mode="packed", seed=t.seed
    )
    examples_per_row = probe.num_examples / probe.rows_in_epoch(0)
    unit = t.micro_batch * world_size
    return max(1, round(t.global_batch / examples_per_row / unit)) * unit, examples_per_row


def make_loader(
    cfg: TrainConfig, dataset: ExampleDataset, d: Dist, rows: int | None = None
) -> tuple[MicroBatchLoader, str]:
    """The micro-batch loader and a line describing the batch: `step_rows` rows a step, or `rows` (from a
    checkpoint, or chosen with train.micro_batch_auto) so that a run resumes with the same steps on any
    number of ranks that divides them, split into micro-batches of train.micro_batch rows."""
    t = cfg.train
    unit = t.micro_batch * d.world_size
    mode = "packed" if cfg.data.packing else "padded"
    configured, examples_per_row = step_rows(cfg, dataset, d.world_size)
    if rows is None:
        rows = configured
    if rows % unit:
        what = f"{'the checkpoint' if rows != t.global_batch else 'train.global_batch'}'s {rows} {'rows' if mode == 'packed' else 'examples'} per step"
        fits = [m for m in range(1, t.micro_batch + 1) if rows % (m * d.world_size) == 0]
        hint = (
            f"; use --train.micro_batch={fits[-1]}"
            if fits
            else f"; no micro-batch size divides it on {d.world_size} ranks"
        )
        raise TrainingError(
            f"{what} must be a multiple of train.micro_batch ({t.micro_batch}) x ranks ({d.world_size}){hint}"
        )
    loader = MicroBatchLoader(
        dataset,
        seq_len=cfg.data.max_len,
        micro_batch_size=t.micro_batch,
        global_batch_rows=rows,
        mode=mode,
        rank=d.rank,
        world_size=d.world_size,
        seed=t.seed,
    )
    split = f"micro-batch {t.micro_batch} x accumulation {loader.accum_steps} x {d.world_size} ranks"
    if mode == "padded":
        return loader, f"global batch {rows} examples = {split} (padded to the longest in each micro-batch)"
    # padding of the epoch's steps: the packed rows' unfilled ends, and the empty rows that complete its last step
    filled = (1.0 - loader.padding_fraction(0)) * loader.rows_in_epoch(0) / (loader.steps_in_epoch(0) * rows)
    return loader, (
        f"global batch {t.global_batch} examples -> {rows} packed rows of {cfg.data.max_len} tokens "
        f"(~{rows * examples_per_row:.1f} examples, padding {1.0 - filled:.2%}) = {split}"
    )
