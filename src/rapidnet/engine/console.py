"""What a training run shows people: its opening facts, progress bars, one line per epoch, notes.

Tasks state facts (``Task.summary``, ``Task.metric_names``); the words and layout are here, in one place, so that
every task's run reads alike. Only rank 0 prints; lines go through ``tqdm.write`` so that they never tear a bar.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from rapidnet.engine.meter import EpochMeter, short_loss

if TYPE_CHECKING:
    from pathlib import Path

    from rapidnet.config import Config
    from rapidnet.engine.task import RunContext

__all__ = ["Console", "format_duration", "format_facts", "format_metrics"]


def format_duration(seconds: float) -> str:
    """``42s``, ``2m05s``, ``1h07m``: a time as people read it in a progress line."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def format_metrics(metrics: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """``evaluate``'s result for the per-epoch line: the metrics in ``names`` (key -> display name) in that order,
    or all of them under their keys when ``names`` is empty; 4 significant digits each (``61.50``, ``0.2512``), and
    a metric's interval ``KEY_ci`` after it to one decimal (``mIoU 60.25 [59.1, 61.3]``)."""
    keys = [key for key in names if key in metrics] if names else list(metrics)
    parts = []
    for key in keys:
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # an interval (shown with its metric) or another non-number
        text = f"{names.get(key, key) if names else key} {float(value):#.4g}"
        ci = metrics.get(f"{key}_ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            text += f" [{float(ci[0]):.1f}, {float(ci[1]):.1f}]"
        parts.append(text)
    return "  ".join(parts)


def _fact(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)) and not value:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fact(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fact(v)}" if v != "" else str(k) for k, v in value.items())
    return str(value)


def format_facts(facts: dict[str, Any]) -> list[str]:
    """``Task.summary()`` as lines: ``"KEY: VALUE"`` each, a mapping value as ``"k v, k v"``, a list in brackets,
    an empty one as ``none``; a None value leaves its line out."""
    return [f"{key}: {_fact(value)}" for key, value in facts.items() if value is not None]


class Console:
    """Rank 0's lines and progress bars (``progress``: show bars; None: when stderr is a terminal)."""

    def __init__(self, is_main: bool, progress: bool | None = None) -> None:
        self.is_main = is_main
        self.progress = progress

    def say(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def bar(self, total: int, initial: int, desc: str) -> tqdm:
        """An epoch's progress bar on stderr (shown on rank 0 only, and there only on a terminal unless asked)."""
        disable: bool | None = None  # None: tqdm shows the bar only on a terminal
        if not self.is_main or self.progress is not None:
            disable = not self.is_main or not self.progress
        return tqdm(
            total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True, leave=False, file=sys.stderr
        )

    @staticmethod
    def step_postfix(meter: EpochMeter, lr: float) -> OrderedDict[str, str]:
        """The bar's running numbers: the epoch's mean loss and named losses so far, the lr, the speed."""
        postfix = OrderedDict(loss=f"{meter.loss:.4f}")
        postfix.update((short_loss(k), f"{v:.3f}") for k, v in meter.losses.items())
        postfix.update(lr=f"{lr:.2e}", img_s=f"{meter.rate:.0f}")
        return postfix

    def opening(
        self,
        facts: dict[str, Any],
        cfg: Config,
        ctx: RunContext,
        world_size: int,
        recipe: str,
        output: Path,
        notes: list[str],
    ) -> None:
        """The run's opening lines: the task's facts, then device and precision, then the recipe (optimizer and
        epochs, worded by the trainer), then the output folder with what callbacks write there (``notes``)."""
        lines = format_facts(facts)
        amp = f"amp {ctx.amp_dtype}".replace("torch.", "") if ctx.amp else "fp32"
        if cfg.train.amp and not ctx.amp:
            amp += " (train.amp is set, but this CPU has no bfloat16 kernels, AVX-512 or AMX, to run it fast)"
        lines.append(
            f"device {ctx.device} x {world_size} process(es), {amp}"
            + (", channels_last" if cfg.train.channels_last else "")
            + (", torch.compile" if cfg.train.compile else "")
        )
        lines.append(recipe)
        lines.append(f"output {output}" + "".join(f" ({note})" for note in notes))
        for line in lines:
            self.say(line)

    @staticmethod
    def epoch_line(
        record: dict[str, Any],
        results: dict[str, dict[str, float]],
        meter: EpochMeter,
        epochs: int,
        split: str,
        names: dict[str, str],
        eval_interval: int,
        best: dict[str, Any] | None,
    ) -> str:
        """``epoch 3/7  train loss 0.6123 (cls 0.5, ...)  val top-1 ...  | ema ...  lr ...  img/s  s  *best*``."""
        text = f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}"
        parts = meter.losses
        if parts:
            text += " (" + ", ".join(f"{short_loss(k)} {v:.4f}" for k, v in parts.items()) + ")"
        metrics = results.get("model")
        text += (
            f"  {split} {format_metrics(metrics, names)}" if metrics else f"  (evaluated every {eval_interval} epochs)"
        )
        for source, other in results.items():
            if source != "model":
                text += f"  | {source} {format_metrics(other, names)}"
        text += f"  lr {record['lr']:.2e}  {record['img_per_s']:.0f} img/s  {record['epoch_time']:.1f} s"
        return text + ("  *best*" if best is not None and best["epoch"] == record["epoch"] else "")
