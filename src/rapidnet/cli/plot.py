"""``rapidnet plot RUN_DIR``: loss and accuracy curves of a training run (its ``log.jsonl``) as a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="draw a run's loss and accuracy curves to PNG", description=__doc__)
    p.add_argument("run", help="run folder written by `rapidnet train` (or its log.jsonl)")
    p.add_argument("-o", "--output", help="PNG file (default: RUN_DIR/curves.png)")
    return p


def plot_run(log_path: Path, out: Path) -> Path:
    """Two panels, loss and accuracy against epoch; written atomically with the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rapidnet.engine.runlog import read_jsonl
    from rapidnet.errors import DataError
    from rapidnet.utils import atomic_write

    records = [r for r in read_jsonl(log_path) if "epoch" in r]
    if not records:
        raise DataError(f"{log_path} has no epoch records yet: plot after the first epoch has finished")
    epochs = [r["epoch"] for r in records]

    def series(key: str) -> list[float] | None:
        values = [r.get(key) for r in records]
        return [float("nan") if v is None else float(v) for v in values] if any(v is not None for v in values) else None

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss"), ("ema_val_loss", "EMA val loss")):
        if (ys := series(key)) is not None:
            ax_loss.plot(epochs, ys, marker="o", label=label)
    for key, label in (("val_top1", "val top-1"), ("val_top5", "val top-5"), ("ema_val_top1", "EMA val top-1")):
        if (ys := series(key)) is not None:
            ax_acc.plot(epochs, ys, marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(log_path.parent.name or log_path))
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    from rapidnet.errors import DataError

    path = Path(args.run)
    log_path = path / "log.jsonl" if path.is_dir() else path
    if not path.exists():
        raise DataError(f"run folder {path} does not exist: pass the --output folder of `rapidnet train`")
    out = Path(args.output) if args.output else log_path.parent / "curves.png"
    plot_run(log_path, out)
    print(f"wrote {out}")
    return 0
