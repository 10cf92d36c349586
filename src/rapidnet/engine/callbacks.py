"""Hooks into ``Trainer.fit`` and the engine's built-in ones: EMA, BN-statistics averaging, best checkpoint, export
of the best weights, the final report on a split kept apart from selection, TensorBoard.

A callback subclasses :class:`~rapidnet.engine.hooks.Callback` (the hooks, when the trainer calls them, and the
public :class:`~rapidnet.engine.hooks.TrainerAPI` each hook receives are documented in :mod:`rapidnet.engine.hooks`):
callbacks read the trainer's public attributes, print through ``trainer.say`` and never reach into its internals.

The built-in callbacks keep the checkpoint layout readers expect: EMA weights under ``model_ema``, the best result
under ``best``. Modelled on Lightning's callbacks and mmengine's hooks, with only the hooks this engine needs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from rapidnet.engine.checkpoint import copy_checkpoint, load_training_state
from rapidnet.engine.console import format_metrics
from rapidnet.engine.distributed import barrier
from rapidnet.engine.hooks import Callback, FitResult, TrainerAPI
from rapidnet.engine.run_folder import BEST, BEST_WEIGHTS
from rapidnet.errors import CheckpointError

__all__ = [
    "BEST",
    "BEST_WEIGHTS",
    "BatchNormAveraging",
    "BestCheckpoint",
    "Callback",
    "ExportBest",
    "FinalReport",
    "ModelEma",
    "TensorBoard",
    "default_callbacks",
    "tensorboard_available",
]


class ModelEma(Callback):
    """timm's ``ModelEmaV3`` of the model, updated after every optimizer update, saved as ``model_ema``.

    With ``evaluate`` its weights are evaluated after the model's, as ``results["ema"]`` (logged ``ema_val_*``), and
    can be chosen as the best weights.
    """

    name = "ema"

    def __init__(self, decay: float, warmup: bool = False, evaluate: bool = True) -> None:
        self.decay, self.warmup, self.evaluate = decay, warmup, evaluate
        self.ema: Any = None

    def setup(self, trainer: TrainerAPI) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(trainer.model, decay=self.decay, use_warmup=self.warmup)
        trainer.weights[self.name] = self.ema.module

    def on_load_checkpoint(self, trainer: TrainerAPI, state: dict[str, Any]) -> None:
        try:
            self.ema.module.load_state_dict(state.get("model_ema") or state["model"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(
                f"{trainer.resume} does not fit this model/optimizer ({first}): resume with the config it was "
                "trained with"
            ) from None

    def on_optimizer_step(self, trainer: TrainerAPI) -> None:
        self.ema.update(trainer.model, step=trainer.updates)

    def on_evaluate(self, trainer: TrainerAPI, results: dict[str, dict[str, float]]) -> None:
        if self.evaluate:
            results[self.name] = trainer.task.evaluate(self.ema.module)

    def on_save_checkpoint(self, trainer: TrainerAPI, state: dict[str, Any]) -> None:
        state["model_ema"] = self.ema.module.state_dict()


class BatchNormAveraging(Callback):
    """Under DDP without SyncBN each process's BN statistics drift apart: average them (timm's ``distribute_bn``)
    over processes at every epoch end, for every set of weights, so that all processes evaluate, and rank 0 saves,
    the same model. Nothing on one process."""

    def on_train_epoch_end(self, trainer: TrainerAPI) -> None:
        if not trainer.info.distributed:
            return
        from timm.utils import distribute_bn

        for module in trainer.weights.values():
            distribute_bn(module, trainer.info.world_size, reduce=True)


class BestCheckpoint(Callback):
    """Chooses the best epoch by ``metric`` over every evaluated set of weights and copies its ``last.pt`` to
    ``best.pt``; the choice (``{"metric", "value", "epoch", "source"}``) is saved under ``best``.

    With ``publish`` (the one :func:`default_callbacks` adds) the choice is also the trainer's ``best``, which the
    epoch lines, logs and ``FitResult`` report; another selector (a second metric) keeps its choice to itself.
    """

    def __init__(self, metric: str, higher_is_better: bool = True, filename: str = BEST, publish: bool = False) -> None:
        self.metric = metric
        self.better: Callable[[float, float], bool] = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
        self.filename = filename
        self.publish = publish
        self.best: dict[str, Any] | None = None
        self.improved = False  # this epoch gave a new best

    def _set(self, trainer: TrainerAPI, best: dict[str, Any] | None) -> None:
        self.best = best
        if self.publish:
            trainer.best = best

    def on_load_checkpoint(self, trainer: TrainerAPI, state: dict[str, Any]) -> None:
        self._set(trainer, state.get("best"))

    def on_train_epoch_end(self, trainer: TrainerAPI) -> None:
        self.improved = False

    def on_evaluate(self, trainer: TrainerAPI, results: dict[str, dict[str, float]]) -> None:
        score, source = float("nan"), "model"
        for i, (name, metrics) in enumerate(results.items()):
            value = metrics.get(self.metric, float("nan"))
            if i == 0 or self.better(value, score):
                score, source = value, name
        if math.isfinite(score) and (self.best is None or self.better(score, self.best["value"])):
            # trainer.epoch already counts the epoch just trained (last.pt is saved before the evaluation)
            self._set(trainer, {"metric": self.metric, "value": float(score), "epoch": trainer.epoch, "source": source})
            self.improved = True

    def on_save_checkpoint(self, trainer: TrainerAPI, state: dict[str, Any]) -> None:
        state["best"] = self.best

    def on_epoch_end(self, trainer: TrainerAPI, record: dict[str, Any]) -> None:
        if self.improved and trainer.info.is_main:
            copy_checkpoint(trainer.last_path, trainer.output / self.filename)


class ExportBest(Callback):
    """Writes the best weights users deploy (``Task.export``) whenever ``selector`` finds a new best epoch."""

    def __init__(self, selector: BestCheckpoint, filename: str = BEST_WEIGHTS) -> None:
        self.selector = selector
        self.filename = filename

    def on_epoch_end(self, trainer: TrainerAPI, record: dict[str, Any]) -> None:
        best = self.selector.best
        if self.selector.improved and best is not None and trainer.info.is_main:
            trainer.task.export(trainer.weights.get(best["source"], trainer.model), trainer.output / self.filename)


class FinalReport(Callback):
    """After a completed run of a task that keeps a split for reporting (``Task.report_split``, e.g. val while
    ``evaluate`` selects on dev): that split's metrics for the best weights (``best.pt``: the epoch ``selector``
    chose) and for the final ones (of the same source, model or EMA), as one ``log.jsonl`` record and two lines.

    The record: ``{"epoch", "step", "report": SPLIT, "selected_on": Task.eval_split, "best_epoch", "best_source",
    "SPLIT_best_<metric>", "SPLIT_final_<metric>"}`` (intervals under ``..._<metric>_ci``); ``FitResult.report`` has the
    same as ``{"split", "best", "final", "best_epoch"}``. When the best epoch is the last, both are the same weights,
    scored once. Nothing happens for an interrupted run (its resume reports at the end).
    """

    def __init__(self, selector: BestCheckpoint, filename: str = BEST) -> None:
        self.selector = selector
        self.filename = filename

    def _best_weights(self, trainer: TrainerAPI, source: str) -> nn.Module:
        barrier(trainer.info)  # rank 0 copied the best epoch's last.pt to best.pt
        path = trainer.output / self.filename
        state = load_training_state(path)
        key = "model" if source == "model" else f"model_{source}"
        if key not in state:
            raise CheckpointError(f"{path} holds no {source} weights: resume the run from its last.pt to report again")
        model = copy.deepcopy(trainer.model)
        model.load_state_dict(state[key])
        return model

    def on_fit_end(self, trainer: TrainerAPI, result: FitResult) -> None:
        task, split = trainer.task, trainer.task.report_split
        if split is None or result.status != "completed":
            return
        started = time.perf_counter()
        best = self.selector.best
        source = best["source"] if best is not None else "model"
        final = task.evaluate_report(trainer.weights.get(source, trainer.model))
        chosen: dict[str, Any] | None = None
        if best is not None:
            same = best["epoch"] == trainer.epoch
            chosen = final if same else task.evaluate_report(self._best_weights(trainer, source))
        record: dict[str, Any] = {
            "epoch": trainer.epoch,
            "step": trainer.updates,
            "report": split,
            "selected_on": task.eval_split,
            "best_epoch": best["epoch"] if best is not None else None,
            "best_source": source,
        }
        for name, metrics in (("best", chosen), ("final", final)):
            record.update({f"{split}_{name}_{k}": v for k, v in (metrics or {}).items()})
        record["report_time"] = round(time.perf_counter() - started, 3)  # outside a time budget: it is not training
        trainer.log.append(record)
        names = task.metric_names
        if chosen is not None and best is not None:
            trainer.say(f"{split}, best weights (epoch {best['epoch']}): {format_metrics(chosen, names)}")
        trainer.say(f"{split}, final weights (epoch {trainer.epoch}): {format_metrics(final, names)}")
        result.report = {"split": split, "best": chosen, "final": final, "best_epoch": record["best_epoch"]}


def tensorboard_available() -> bool:
    """True when ``torch.utils.tensorboard`` can write event files (the ``tensorboard`` package is installed)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class TensorBoard(Callback):
    """Event files under ``RUN/tensorboard`` (rank 0): every logged step's losses, lr and speed as ``train/*``,
    every epoch's numbers (losses, validation metrics, lr, times) as ``epoch/*``, all against the optimizer update.

    A resumed run drops the events after its resume point (``purge_step``), as it drops those lines of the logs.
    """

    def __init__(self, folder: str = "tensorboard") -> None:
        self.folder = folder
        self.writer: Any = None

    def output_note(self) -> str:
        return f"TensorBoard: {self.folder}/"

    def on_fit_start(self, trainer: TrainerAPI) -> None:
        if not trainer.info.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        purge = trainer.updates + 1 if trainer.resume is not None else None
        self.writer = SummaryWriter(log_dir=str(Path(trainer.output) / self.folder), purge_step=purge)

    def _scalars(self, prefix: str, record: dict[str, Any], step: int, skip: tuple[str, ...]) -> None:
        for key, value in record.items():
            if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, global_step=step)

    def on_train_step_end(self, trainer: TrainerAPI, record: dict[str, Any] | None) -> None:
        if self.writer is not None and record is not None:
            self._scalars("train", record, int(record["update"]), ("epoch", "step", "update"))

    def on_epoch_end(self, trainer: TrainerAPI, record: dict[str, Any]) -> None:
        if self.writer is not None:
            self._scalars("epoch", record, int(record["step"]), ("step",))
            self.writer.flush()

    def teardown(self, trainer: TrainerAPI) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_callbacks(trainer: TrainerAPI) -> list[Callback]:
    """What ``cfg`` asks for: BN averaging (acts under DDP), EMA (``ema.enabled``), best checkpoint and export of the
    best weights (by the task's ``primary_metric``), the final report (a task with a ``report_split``), TensorBoard
    (when installed)."""
    cfg, task = trainer.cfg, trainer.task
    callbacks: list[Callback] = [BatchNormAveraging()]
    if cfg.ema.enabled:
        callbacks.append(ModelEma(cfg.ema.decay, cfg.ema.warmup, cfg.ema.evaluate))
    selector = BestCheckpoint(task.primary_metric, task.higher_is_better, publish=True)
    callbacks += [selector, ExportBest(selector)]
    if task.report_split is not None:
        callbacks.append(FinalReport(selector))
    if tensorboard_available():
        callbacks.append(TensorBoard())
    return callbacks
