"""Will a run fit, and how long will it take: the resolved training config -> per-rank memory, whether it
fits, the settings that would, and the run's time.

    python -m c2a.plan --config configs/claude2-alpaca-13b.toml --gpus 8 [--gpu h100] [--gpu-memory 80]
        [--nodes 1] [--mfu 0.4] [--examples N --mean-tokens M --trained-fraction F] [--json] [--section.key=value ...]

The recipe and its --section.key=value overrides are the trainer's (`python -m c2a.train --help` lists them).
Data lengths come from a prepared cache, a local data file or the demo task; otherwise from --examples /
--mean-tokens / --trained-fraction, stated as assumptions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from c2a.errors import USER_ERRORS, message, report
from c2a.options import parse_args
from c2a.plan.report import plan, table
from c2a.plan.workload import DEFAULT_MFU, GPUS, Machine


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m c2a.plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--gpus", type=int, required=True, help="the number of GPUs the run would use")
    ap.add_argument(
        "--gpu", type=str.lower, choices=list(GPUS), default="h100", help="the card (its bf16 peak and memory)"
    )
    ap.add_argument("--gpu-memory", type=float, help="GB of memory per GPU (default: the card's)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over")
    ap.add_argument(
        "--mfu",
        type=float,
        help=f"model FLOPs utilisation for the run's time (default {DEFAULT_MFU * 100:.0f}%%, measured)",
    )
    ap.add_argument("--examples", type=int, help="training examples (instead of reading the data)")
    ap.add_argument("--mean-tokens", type=float, help="mean tokens of an example (instead of reading the data)")
    ap.add_argument("--trained-fraction", type=float, help="share of tokens trained on (instead of reading the data)")
    ap.add_argument("--json", action="store_true", help="print every number as JSON instead of the table")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(rest)  # --config and the trainer's --section.key overrides
    except (KeyError, ValueError) as e:  # a usage error: argparse's exit code 2
        parser.error(message(e))
    flops, memory = GPUS[args.gpu]
    given = args.mfu is not None
    machine = Machine(
        args.gpus,
        args.nodes,
        args.gpu.upper(),
        args.gpu_memory or memory,
        flops,
        args.mfu if given else DEFAULT_MFU,
        "given" if given else "measured on one H200 for an 8-layer 7B-shaped model; multi-GPU not measured",
    )
    try:
        result = plan(cfg, machine, args.examples, args.mean_tokens, args.trained_fraction)
    except (*USER_ERRORS, OSError) as e:  # a config, checkpoint or data file to fix: the message
        return report(e)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
