"""``rapidnet plot RUN_DIR``: loss and accuracy curves of a training run (its ``log.jsonl``) as a PNG.

A run whose steps return named losses (Mask R-CNN's five terms, distillation's two) gets a third panel with each
term by optimizer update (from ``steps.jsonl``; from the epoch means of ``log.jsonl`` when there is no steps file).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from rapidnet.errors import DataError, clip

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
    # a dense run that chose its best epoch on a dev split logs that split per epoch (val only in its final report)
    ("dev_bbox_AP", "dev box AP"),
    ("dev_segm_AP", "dev mask AP"),
    ("dev_mIoU", "dev mIoU"),
    ("dev_mAcc", "dev mAcc"),
    ("dev_aAcc", "dev aAcc"),
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="draw a run's loss and accuracy curves to PNG", description=__doc__)
    p.add_argument("run", help="run folder written by `rapidnet train` (or its log.jsonl)")
    p.add_argument("-o", "--output", help="PNG file (default: RUN_DIR/curves.png)")
    return p


def _series(records: list[dict[str, Any]], key: str) -> list[float] | None:
    """The values of ``key`` per record (NaN where absent), None when no record has it; a value that is not a number
    (a log edited by hand, or written by another program) is a one-line error naming the key and the epoch."""
    values = [r.get(key) for r in records]
    if all(v is None for v in values):
        return None
    out = []
    for record, value in zip(records, values, strict=True):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            where = f"epoch {record['epoch']!r}" if "epoch" in record else "a record"
            shown = clip(repr(value))
            raise DataError(f"log {key} of {where} is {shown}, not a number: was the log edited by hand?")
        out.append(float("nan") if value is None else float(value))
    return out


def _axis(records: list[dict[str, Any]], key: str) -> list[float]:
    """x values: ``key`` of each record (checked to be numbers), the record's index where it is absent."""
    values = _series(records, key)
    if values is None:
        return [float(i) for i in range(len(records))]
    return [float(i) if math.isnan(v) else v for i, v in enumerate(values)]


def loss_terms(log_records: list[dict[str, Any]], step_records: list[dict[str, Any]]) -> dict[str, Any]:
    """The named losses to draw: ``{"x": [...], "xlabel": ..., "terms": {name: values}}``, empty without any.

    Per logged step (x: optimizer update) when ``steps.jsonl`` has them, else per epoch from ``train_loss_*``.
    """
    names = list(dict.fromkeys(k for r in step_records for k in r if k.startswith("loss_")))
    if names:
        terms = {name: _series(step_records, name) for name in names}
        return {
            "x": _axis(step_records, "update"),
            "xlabel": "optimizer update",
            "terms": terms,
        }
    keys = list(dict.fromkeys(k for r in log_records for k in r if k.startswith("train_loss_")))
    if not keys:
        return {}
    terms = {key[len("train_") :]: _series(log_records, key) for key in keys}
    return {"x": _series(log_records, "epoch"), "xlabel": "epoch", "terms": terms}


def _read_log(path: Path, missing_ok: bool = False) -> list[dict[str, Any]]:
    """``read_jsonl`` with a one-line error for a log that is not a readable text file."""
    from rapidnet.engine.runlog import read_jsonl

    try:
        return read_jsonl(path, missing_ok=missing_ok)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise DataError(f"cannot read log {path} ({reason}): pass the folder written by `rapidnet train`") from None


def plot_run(log_path: Path, out: Path) -> Path:
    """Loss and accuracy against epoch (and named losses, when logged); written atomically with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from rapidnet.utils import atomic_write

    records = [r for r in _read_log(log_path) if "epoch" in r and "report" not in r]  # the final report is no epoch
    if not records:
        raise DataError(f"{log_path} has no epoch records yet: plot after the first epoch has finished")
    epochs = _series(records, "epoch")
    terms = loss_terms(records, _read_log(log_path.parent / "steps.jsonl", missing_ok=True))

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
        ax_acc.set(xlabel="epoch", ylabel="%", title="evaluation")
    if terms:
        ax_terms = axes[2]
        marker = "o" if terms["xlabel"] == "epoch" else None
        for name, ys in terms["terms"].items():
            if ys is not None:
                ax_terms.plot(terms["x"], ys, marker=marker, label=name)
        ax_terms.set(xlabel=terms["xlabel"], ylabel="loss", title="training loss terms")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_xlabel() == "epoch":  # a short run would otherwise get ticks at epoch 1.25, 1.5, ...
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    from rapidnet.utils import refuse_overwriting_input

    path = Path(args.run)
    log_path = path / "log.jsonl" if path.is_dir() else path
    if not path.exists():
        raise DataError(f"run folder {path} does not exist: pass the --output folder of `rapidnet train`")
    out = Path(args.output) if args.output else log_path.parent / "curves.png"
    refuse_overwriting_input(out, log_path)
    plot_run(log_path, out)
    print(f"wrote {out}")
    return 0
