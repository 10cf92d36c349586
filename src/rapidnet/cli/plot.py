"""``rapidnet plot RUN_DIR``: loss and accuracy curves of a training run (its ``log.jsonl``) as a PNG.

A run whose steps return named losses (Mask R-CNN's five terms, distillation's two) gets a third panel with each
term by optimizer update (from ``steps.jsonl``; from the epoch means of ``log.jsonl`` when there is no steps file).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rapidnet.engine.runlog import read_jsonl
from rapidnet.errors import DataError
from rapidnet.utils import atomic_write

#: validation metrics drawn in the second panel, when the log has them: classification, then the dense tasks
_METRICS = (
    ("val_top1", "val top-1"),
    ("val_top5", "val top-5"),
    ("ema_val_top1", "EMA val top-1"),
    ("val_bbox_AP", "val box AP"),
    ("val_bbox_AP50", "val box AP50"),
    ("val_segm_AP", "val mask AP"),
    ("val_mIoU", "val mIoU"),
    ("val_mAcc", "val mAcc"),
    ("val_aAcc", "val aAcc"),
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="draw a run's loss and accuracy curves to PNG", description=__doc__)
    p.add_argument("run", help="run folder written by `rapidnet train` (or its log.jsonl)")
    p.add_argument("-o", "--output", help="PNG file (default: RUN_DIR/curves.png)")
    return p


def _series(records: list[dict[str, Any]], key: str) -> list[float] | None:
    values = [r.get(key) for r in records]
    return [float("nan") if v is None else float(v) for v in values] if any(v is not None for v in values) else None


def loss_terms(log_records: list[dict[str, Any]], step_records: list[dict[str, Any]]) -> dict[str, Any]:
    """The named losses to draw: ``{"x": [...], "xlabel": ..., "terms": {name: values}}``, empty without any.

    Per logged step (x: optimizer update) when ``steps.jsonl`` has them, else per epoch from ``train_loss_*``.
    """
    names = list(dict.fromkeys(k for r in step_records for k in r if k.startswith("loss_")))
    if names:
        terms = {name: _series(step_records, name) for name in names}
        return {
            "x": [r.get("update", i) for i, r in enumerate(step_records)],
            "xlabel": "optimizer update",
            "terms": terms,
        }
    keys = list(dict.fromkeys(k for r in log_records for k in r if k.startswith("train_loss_")))
    if not keys:
        return {}
    terms = {key[len("train_") :]: _series(log_records, key) for key in keys}
    return {"x": [r["epoch"] for r in log_records], "xlabel": "epoch", "terms": terms}


def plot_run(log_path: Path, out: Path) -> Path:
    """Loss and accuracy against epoch (and named losses, when logged); written atomically with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(log_path) if "epoch" in r]
    if not records:
        raise DataError(f"{log_path} has no epoch records yet: plot after the first epoch has finished")
    epochs = [r["epoch"] for r in records]
    terms = loss_terms(records, read_jsonl(log_path.parent / "steps.jsonl", missing_ok=True))

    panels = 3 if terms else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss"), ("ema_val_loss", "EMA val loss")):
        if (ys := _series(records, key)) is not None:
            ax_loss.plot(epochs, ys, marker="o", label=label)
    classification = any(_series(records, key) is not None for key in ("val_top1", "val_top5", "ema_val_top1"))
    for key, label in _METRICS:
        if (ys := _series(records, key)) is not None:
            ax_acc.plot(epochs, ys, marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    if classification or not any(_series(records, key) is not None for key, _ in _METRICS):
        ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    else:
        ax_acc.set(xlabel="epoch", ylabel="%", title="validation")
    if terms:
        ax_terms = axes[2]
        marker = "o" if terms["xlabel"] == "epoch" else None
        for name, ys in terms["terms"].items():
            if ys is not None:
                ax_terms.plot(terms["x"], ys, marker=marker, label=name)
        ax_terms.set(xlabel=terms["xlabel"], ylabel="loss", title="training loss terms")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(str(log_path.parent.name or log_path))
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:

    path = Path(args.run)
    log_path = path / "log.jsonl" if path.is_dir() else path
    if not path.exists():
        raise DataError(f"run folder {path} does not exist: pass the --output folder of `rapidnet train`")
    out = Path(args.output) if args.output else log_path.parent / "curves.png"
    plot_run(log_path, out)
    print(f"wrote {out}")
    return 0
