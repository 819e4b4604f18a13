"""Training curves of a run directory: training loss, validation loss and learning rate against steps.

    python -m c2a.train.plot OUT_DIR [--out FILE.png]       # default OUT_DIR/metrics.png

Reads OUT_DIR/metrics.jsonl (one record per logged step; `val_loss` on the validation steps). A run writes
the same plot at its end when matplotlib is installed (`pip install matplotlib`, or the `plot` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a run writes it at its first logged step (train.log_every)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{n}: a record needs an integer \"step\"")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no records yet")
    return rows


def figure(rows: Sequence[dict[str, Any]]) -> Any:
    """The matplotlib Figure: losses on top (nats per target), the learning rate below."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), gridspec_kw={"height_ratios": [3, 1]})
    for key, label, style in (("loss", "training loss", "-"), ("val_loss", "validation loss", "o-")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            steps, values = zip(*points)
            loss_ax.plot(steps, values, style, label=label, markersize=4)
    loss_ax.set_ylabel("cross-entropy (nats / target)")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr = [(r["step"], r["lr"]) for r in rows if r.get("lr") is not None]
    if lr:
        lr_ax.plot(*zip(*lr), color="tab:gray")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_metrics(out_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Draws OUT_DIR/metrics.jsonl to `dest` (default OUT_DIR/metrics.png) and returns its path."""
    out_dir = Path(out_dir)
    dest = Path(dest) if dest else out_dir / "metrics.png"
    fig = figure(read_metrics(out_dir / "metrics.jsonl"))
    fig.savefig(dest, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m c2a.train.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="the run directory (holds metrics.jsonl)")
    ap.add_argument("--out", type=Path, help="image file (default OUT_DIR/metrics.png)")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    try:
        path = plot_metrics(args.out_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
