"""Entry point: `torchrun --nproc_per_node=N -m c2a.train [--config FILE.toml] [--section.key=value ...]`,
or `python -m c2a.train ...` as a single process. `--help` lists every key with its default."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

from c2a.errors import EXIT_USAGE, EXIT_USER_ERROR, USER_ERRORS, ConfigError, message
from c2a.options import help_text, parse_args, wants_help
from c2a.train.checkpoint import CheckpointSaveError, CheckpointUnusable
from c2a.train.errors import TrainingError
from c2a.train.lifecycle import EXIT_STOPPED, OutDirUnusable, RunLocked, RunStopped, watch_parent
from c2a.train.loop import run
from c2a.train.parallel import init_distributed, shutdown_and_exit

log = logging.getLogger("c2a")

# User errors raised by every rank alike (each decides from the same config, files and all-reduced values):
# only rank 0 prints them. The others (a data file rank 0 alone tokenizes, a rank's own I/O) are printed
# where raised.
COLLECTIVE_ERRORS = (ConfigError, TrainingError, RunLocked, OutDirUnusable, CheckpointUnusable, CheckpointSaveError)
# torchrun stops every rank as soon as one exits with an error: the ranks that stay silent about a collective
# error wait this long first, so that rank 0 (which raised it too, at about the same point) has said it
COLLECTIVE_ERROR_GRACE_S = 10.0


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[c2a{'' if rank == 0 else f' rank {rank}'}] %(message)s",
        stream=sys.stderr,
    )


def _print_summary(s: dict[str, Any]) -> None:
    lines = [
        "",
        "== c2a training finished ==",
        f"steps            {s['steps']} ({s['skipped_steps']} skipped as non-finite)",
        f"time             {s['wall_seconds']:.0f} s in this session; {s['train_seconds']:.0f} s in training steps over the whole run",
        f"tokens           {s['tokens']:,} ({s['trained_tokens']:,} trained targets)",
    ]
    if "final_loss" in s:
        lines.append(f"final loss       {s['final_loss']:.4f}")
    if "val_loss" in s:
        lines.append(
            f"validation loss  {s['val_loss']:.4f} (perplexity {s['val_ppl']:.3f}, {s['val_targets']:,} targets)"
        )
    if "early_stopped_at" in s:
        lines.append(
            f"early stop       at step {s['early_stopped_at']}; final/ is {s.get('exported_checkpoint', 'the last step')}"
        )
    if "best_checkpoint" in s:
        lines.append(f"best checkpoint  {s['best_checkpoint']} (validation loss {s['best_val_loss']:.4f})")
    if s.get("demo_after"):
        before, after = s["demo_before"], s["demo_after"]
        lines.append(
            f"demo exact match before {100 * before['accuracy']:.1f}% -> after {100 * after['accuracy']:.1f}% "
            f"({after['examples']} held-out examples, greedy)"
        )
        lines.append(
            "  per task: " + ", ".join(f"{k} {100 * v['accuracy']:.0f}%" for k, v in after["per_task"].items())
        )
    lines += [
        f"metrics          {s['out_dir']}/metrics.jsonl" + (f" (plotted: {s['plot']})" if "plot" in s else ""),
        f"checkpoints      {s['out_dir']}/checkpoints/",
        f"final model      {s['final']}  (HF safetensors, the tokenizer files, the trained chat_template.jinja)",
    ]
    if "card" in s:
        lines.append(f"model card       {s['card']}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
    except (KeyError, ValueError) as e:
        print(f"error: {message(e)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        d = init_distributed(cfg.train.replicas, cfg.train.deterministic)
    except ValueError as e:  # train.replicas that does not divide the ranks
        print(f"error: {message(e)}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(d.rank)
    watch_parent()  # under torchrun: exit if the launcher dies, instead of finishing the run as an orphan
    try:
        summary = run(cfg, d)
    except RunStopped as e:
        if d.is_main:
            print(f"[c2a] {e}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except USER_ERRORS as e:
        if d.is_main or not isinstance(e, COLLECTIVE_ERRORS):
            log.error("error: %s", message(e))
        else:
            time.sleep(COLLECTIVE_ERROR_GRACE_S)
        return EXIT_USER_ERROR
    if d.is_main and "already_finished" not in summary:  # a finished run re-run: run() has said so
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 1
    # never return into interpreter finalization while gloo threads may still be running (see there)
    shutdown_and_exit(code)
