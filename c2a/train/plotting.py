"""Training curves of a run directory: training loss, validation loss and learning rate against steps, drawn
from its metrics.jsonl with matplotlib (an optional extra: `pip install matplotlib`, or the `plot` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from c2a.train.metrics import METRICS_FILE, read_metrics


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
    rows = read_metrics(out_dir)
    if not rows:
        raise ValueError(f"{out_dir / METRICS_FILE} holds no records yet")
    fig = figure(rows)
    fig.savefig(dest, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return dest
