"""Training curves of a run directory: training loss, validation loss and learning rate against steps.

    python -m c2a.train.plot OUT_DIR [--output FILE.png]       # default OUT_DIR/metrics.png

Reads OUT_DIR/metrics.jsonl (one record per logged step; `val_loss` on the validation steps). A run writes
the same plot at its end with eval.plot = true when matplotlib is installed (`pip install matplotlib`, or
the `plot` extra).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from c2a.errors import USER_ERRORS, report
from c2a.train.plotting import plot_metrics


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m c2a.train.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="the run directory (holds metrics.jsonl)")
    ap.add_argument("--output", "--out", type=Path, help="image file (default OUT_DIR/metrics.png)")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return report(ImportError("plotting needs matplotlib: pip install matplotlib"))
    try:
        path = plot_metrics(args.out_dir, args.output)
    except USER_ERRORS as e:
        return report(e)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
