"""The training loop every task shares: ``Trainer(task, cfg).fit()``.

One process or many (torchrun, DDP), CPU or CUDA, AMP (bfloat16 autocast on CPU, float16 + GradScaler on CUDA),
channels_last, torch.compile, gradient clipping, a timm optimizer and schedule; per epoch a ``last.pt`` written
atomically; ``log.jsonl`` per epoch and ``steps.jsonl`` every few steps, with every named loss a step returns
(``StepOutput.losses``) beside the total; tqdm bars on rank 0. What varies with the recipe is a callback
(``rapidnet.engine.callbacks``): EMA, BN-statistics averaging under DDP, ``best.pt`` and the task's exported best
weights, the final report on a split the task keeps apart from selection (``Task.report_split``: after a completed
run, that split's metrics for the best and the final weights, one more ``log.jsonl`` record marked ``"report"``),
TensorBoard event files. Per-epoch metrics are logged under the task's ``eval_split`` (``val_top1``,
``dev_bbox_AP``). Runs are stoppable and exactly resumable at any step:

- SIGINT/SIGTERM: the current step finishes, every process stops at the same step, ``last.pt`` is saved and
  ``fit`` returns ``status="interrupted"`` (a second Ctrl-C aborts at once, keeping the previous ``last.pt``);
- a NaN/inf loss stops the run before the bad gradient is applied, keeps the last good checkpoint and raises a
  one-line :class:`NonFiniteLossError` naming the epoch and step;
- at an epoch end ``last.pt`` is written before the evaluation (then again after it, with the new best), so a
  failing evaluation (an unreadable validation image) loses no training: resuming redoes the evaluation;
- a new run refuses a folder holding another run, and so does a resume into another run's folder, unless
  ``force=True`` (``--force``), which deletes that run's files first; a resume into a new folder starts its logs
  from the resumed run's; stale temporary files of killed saves in the run folder are removed at the start;
- ``resume=PATH`` restores everything (weights, EMA, optimizer, scheduler, scaler, position, the epoch's running
  loss sums, RNG states, callback states) and refuses a checkpoint of another model or recipe; per-sample and
  per-step seeding (``rapidnet.engine.seeding``) makes the following losses identical to an uninterrupted run's on
  CPU.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.scheduler import create_scheduler_v2
from torch import nn
from tqdm import tqdm

from rapidnet.config import Config, config_from_dict, config_to_dict, save_config, scaled_lr
from rapidnet.engine.budget import Budget, remaining_s
from rapidnet.engine.callbacks import BEST, BEST_WEIGHTS, BestCheckpoint, Callback, TensorBoard, default_callbacks
from rapidnet.engine.checkpoint import (
    capture_rng,
    check_resume_config,
    copy_checkpoint,
    load_training_state,
    restore_rng,
    save_training_state,
)
from rapidnet.engine.conv_taps import trim_padding_taps_
from rapidnet.engine.cpu_share import ThreadGovernor, free_threads
from rapidnet.engine.distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, init_distributed
from rapidnet.engine.runlog import JsonlLog
from rapidnet.engine.seeding import seed_everything, seed_step
from rapidnet.engine.task import RunContext, Task
from rapidnet.errors import CheckpointError, ConfigError, DataError, RapidNetError
from rapidnet.utils import cpu_has_bfloat16, remove_stale_temp_files, write_error

__all__ = [
    "BEST",
    "BEST_WEIGHTS",
    "LAST",
    "MAY_DIFFER_ON_RESUME",
    "RUN_FILES",
    "FitResult",
    "NonFiniteLossError",
    "Trainer",
    "format_facts",
    "format_metrics",
    "loss_key",
]

LAST = "last.pt"
LOG, STEPS_LOG, CONFIG = "log.jsonl", "steps.jsonl", "config.yaml"
#: what a finished epoch leaves in a run folder: a folder with any of them holds a run that a new one would destroy
RUN_RESULTS = (LAST, BEST, BEST_WEIGHTS, LOG)
#: every file a run writes into its folder (a resume into another run's folder would replace or splice them all)
RUN_FILES = (*RUN_RESULTS, STEPS_LOG, CONFIG)

#: config keys a resumed run may change: they affect where and how fast it runs, not what it computes
MAY_DIFFER_ON_RESUME = (
    "train.output",
    "train.device",
    "train.compile",
    "train.trim_padding_taps",
    "train.adapt_threads",
    "train.log_interval",
    "train.epochs",
    "train.time_budget",
    "data.workers",
    "data.pin_memory",
    "data.eval_batch_size",
    "data.skip_corrupt",
)


class NonFiniteLossError(RapidNetError, FloatingPointError):
    """The loss became NaN or infinite; the run stopped before applying the step."""


@dataclass
class FitResult:
    """How ``fit`` ended, for the CLI's closing lines and for callers."""

    status: str  # "completed" or "interrupted"
    output: Path
    epochs_done: int
    best: dict[str, Any] | None
    last_epoch: dict[str, Any] | None = None
    signal: int | None = None
    notes: list[str] = field(default_factory=list)
    #: the final report on the task's ``report_split`` (``{"split", "best", "final", "best_epoch"}``), if it has one
    report: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        """0 when completed; 128 + signal number when interrupted (the shell's convention)."""
        return 0 if self.status == "completed" else 128 + int(self.signal or signal.SIGINT)


def loss_key(name: str) -> str:
    """The log key of a named loss: its name when it starts with ``loss_`` (torchvision's), else ``loss_NAME``."""
    return name if name.startswith("loss_") else f"loss_{name}"


def _short_loss(name: str) -> str:
    """``loss_box_reg`` -> ``box_reg``: the progress bar's and the epoch line's label."""
    return loss_key(name)[len("loss_") :]


def _floats(values: Iterable[Any]) -> list[float]:
    """Python floats of scalar tensors (one device sync for all of them) or numbers."""
    items = list(values)
    tensors = [v.detach().float().reshape(()) for v in items if isinstance(v, torch.Tensor)]
    if len(tensors) != len(items):
        return [float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v) for v in items]
    if not tensors:
        return []
    return torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()


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


def _same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name one folder (symbolic links followed; a folder not yet created is compared by path)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


@dataclass
class _Meter:
    """Running sums of the epoch in progress (saved in checkpoints so a resumed epoch reports the same losses)."""

    loss_sum: float = 0.0
    samples: float = 0.0
    time: float = 0.0
    steps: int = 0
    #: named loss -> [sum of value x samples, samples of the steps that returned it]
    parts: dict[str, list[float]] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "samples": self.samples,
            "time": self.time,
            "steps": self.steps,
            "losses": {name: {"sum": s, "samples": n} for name, (s, n) in self.parts.items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.samples = float(state["loss_sum"]), float(state["samples"])
        self.time, self.steps = float(state["time"]), int(state["steps"])
        self.parts = {k: [float(v["sum"]), float(v["samples"])] for k, v in (state.get("losses") or {}).items()}

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else float("nan")

    @property
    def losses(self) -> dict[str, float]:
        """Epoch means of the named losses so far."""
        return {name: s / n if n else float("nan") for name, (s, n) in self.parts.items()}

    @property
    def rate(self) -> float:
        return self.samples / self.time if self.time > 0 else 0.0


class _StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks to stop after the current step, a second Ctrl-C aborts."""

    def __init__(self, announce: bool) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            name = signal.Signals(signum).name
            print(
                f"rapidnet train: {name} received: finishing this step, then saving {LAST} "
                "(Ctrl-C again aborts without saving)",
                file=sys.stderr,
                flush=True,
            )


class Trainer:
    """Runs a :class:`~rapidnet.engine.task.Task` with the engine sections of a :class:`~rapidnet.config.Config`.

    Args:
        task: builds data, model, loss and metrics.
        cfg: the resolved configuration (``train``, ``optim``, ``sched`` and ``ema`` are read here).
        resume: a ``last.pt``/``best.pt`` of this run to continue from.
        force: replace a run already in ``train.output`` (a new run there, or a resume of another run into it):
            its files (:data:`RUN_FILES`, TensorBoard events) are deleted first; without it that is a one-line error.
        progress: show tqdm bars (None: when stderr is a terminal).
        callbacks: more :class:`~rapidnet.engine.callbacks.Callback` s, called after the defaults that ``cfg`` asks
            for (:func:`~rapidnet.engine.callbacks.default_callbacks`).

    While fitting, callbacks may read ``cfg``, ``task``, ``info``, ``ctx``, ``output``, ``resume``, ``model`` (the
    plain module), ``train_model`` (as wrapped for DDP/compile), ``weights`` (name -> module: ``"model"`` and, with
    EMA, ``"ema"``), ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (epochs done), ``step`` (steps done in the
    current epoch), ``updates`` (optimizer updates), ``steps`` (per epoch), ``best`` and ``meter``.
    """

    def __init__(
        self,
        task: Task,
        cfg: Config,
        resume: str | Path | None = None,
        progress: bool | None = None,
        callbacks: Sequence[Callback] | None = None,
        force: bool = False,
    ) -> None:
        self.task = task
        self.cfg = cfg
        self.resume = Path(resume) if resume is not None else None
        self.force = force
        #: the end of the epoch just trained, not yet evaluated and logged: ``{"lr", "evaluate"}``; saved in
        #: ``last.pt`` while its evaluation is pending, so a resume evaluates before training on
        self.pending: dict[str, Any] | None = None
        self.epochs_finished = 0  # epochs ended by this process (the first one prints the time left)
        self.progress = progress
        self.extra_callbacks = list(callbacks or [])
        self.callbacks: list[Callback] = []

    # ---- public -------------------------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train to the configured number of epochs (or until interrupted); return how it ended."""
        info = init_distributed(self.cfg.train.device)
        threads = torch.get_num_threads()
        try:
            return self._fit(info)
        finally:
            torch.set_num_threads(threads)  # the thread governor may have lowered it
            if info.distributed:
                cleanup_distributed()

    @property
    def best(self) -> dict[str, Any] | None:
        """The best result so far (``{"metric", "value", "epoch", "source"}``), from the best-checkpoint callback."""
        for callback in self.callbacks:
            if isinstance(callback, BestCheckpoint):
                return callback.best
        return None

    @property
    def last_path(self) -> Path:
        return self.output / LAST

    # ---- setup --------------------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.info.is_main:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _check_output(self) -> tuple[str, ...]:
        """Refuse to write over another run (one-line ConfigError) unless ``force``; return the run files to delete
        before this run writes (:meth:`_prepare_output` deletes them once the run has been built, so a run that
        fails to start leaves the old one as it was).

        A new run refuses a folder holding results (:data:`RUN_RESULTS`); the logs of a run that stopped before its
        first checkpoint (``steps.jsonl``, TensorBoard events) are no run, and are removed rather than mixed with the
        new ones. A resume into the checkpoint's own folder is what resuming means; into another folder, any run file
        there would be replaced or spliced.
        """
        output, resume = self.output, self.resume
        if resume is not None and _same_folder(resume.parent, output):
            return ()
        found = [name for name in (RUN_RESULTS if resume is None else RUN_FILES) if (output / name).exists()]
        if found and not self.force:
            if resume is None:
                last = output / LAST
                how = f"continue it with --resume {last}, " if last.exists() else ""
                raise ConfigError(
                    f"output folder {output} already holds a run ({', '.join(found)}): {how}choose another --output, "
                    "or pass --force to replace it"
                )
            raise ConfigError(
                f"output folder {output} already holds another run ({', '.join(found)}): resuming {resume} there "
                f"would overwrite it; leave out --output to continue in {resume.parent}, choose an empty --output, "
                "or pass --force to replace that run"
            )
        if found:
            self._say(f"note: --force: replacing the run in {output} ({', '.join(found)})")
            return RUN_FILES
        return (STEPS_LOG,) if resume is None else ()

    def _prepare_output(self, delete: Sequence[str]) -> None:
        """Rank 0, just before the first write: remove stale temporary files of killed saves, delete ``delete`` and
        the TensorBoard events (when replacing a run), and resuming into another folder than the checkpoint's, start
        the logs from the resumed run's so they read as one run."""
        output = self.output
        stale = remove_stale_temp_files(output)
        if stale:
            names = ", ".join(p.name for p in stale)
            self._say(f"note: removed {len(stale)} temporary file(s) left by an interrupted save: {names}")
        board = output / "tensorboard"
        events = sorted(board.glob("events.out.tfevents.*")) if delete and board.is_dir() else []
        for path in [output / name for name in delete] + events:
            try:
                if path.is_file() or path.is_symlink():
                    path.unlink()
            except OSError as e:
                raise ConfigError(f"cannot delete {path} ({e.strerror or e}): remove it by hand") from None
        resume = self.resume
        if resume is not None and not _same_folder(resume.parent, output):
            for name in (LOG, STEPS_LOG):
                if (resume.parent / name).is_file():
                    copy_checkpoint(resume.parent / name, output / name)

    def _read_resume_state(self) -> dict[str, Any] | None:
        if self.resume is None:
            return None
        state = load_training_state(self.resume)
        # through the current schema, so settings added since the checkpoint was written compare as their defaults
        saved = config_to_dict(config_from_dict(state["config"], source=f"the config stored in {self.resume}"))
        changes = check_resume_config(self.resume, saved, config_to_dict(self.cfg), MAY_DIFFER_ON_RESUME)
        for change in changes:
            self._say(f"note: resuming with a changed setting: {change}")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.info.world_size:
            self._say(
                f"note: {self.resume} was written by {saved_world} process(es), this run has {self.info.world_size}: "
                "the global batch and the learning rate change, so losses will differ from an uninterrupted run"
            )
        return state

    def _build(self, info: DistInfo) -> None:
        cfg = self.cfg
        self.info = info
        self.output = Path(cfg.train.output)
        state = self._read_resume_state()  # first: a bad checkpoint is refused before the output folder is touched
        self.budget = self._resume_budget(state)
        delete = self._check_output()
        # bfloat16 autocast is a speed setting: where the CPU would emulate it (14x slower here), fp32 is the fast one
        amp = cfg.train.amp and (info.device.type != "cpu" or cpu_has_bfloat16())
        ctx = RunContext(cfg=cfg, dist=info, output=self.output, amp=amp, channels_last=cfg.train.channels_last)
        self.ctx = ctx
        seed_everything(cfg.train.seed)
        self.task.setup(ctx)
        model = self.task.build_model()
        if state is not None:
            self.task.check_state(state.get("task", {}), str(self.resume))
        self.task.build_loaders()
        model.to(info.device)
        if info.distributed and cfg.train.sync_bn:
            if info.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self._say("note: SyncBatchNorm needs CUDA; on CPU each process normalises over its own batch")
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.train.trim_padding_taps and info.device.type == "cpu":
            trim_padding_taps_(model)
        self.governor = self._pick_threads(state) if cfg.train.adapt_threads else None
        self.model = model
        self.weights: dict[str, nn.Module] = {"model": model}

        self.steps = self.task.steps_per_epoch()
        if self.steps < 1:
            raise DataError(
                f"the training set gives no full batch of {self.task.batch_size} per process "
                f"({info.world_size} process(es)): lower --batch-size or use more data"
            )
        global_batch = self.task.batch_size * info.world_size
        o = cfg.optim
        self.lr = scaled_lr(o, global_batch)
        self.lr_note = "set" if o.lr is not None else f"{o.base_lr:g} x {global_batch}/{o.lr_base_size}"
        self.optimizer = self.task.build_optimizer(model, self.lr)
        self.scheduler = self._build_scheduler()
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=amp and info.device.type == "cuda")

        self.epoch, self.step, self.updates = 0, 0, 0
        self.meter = _Meter()
        self.callbacks = [*default_callbacks(self), *self.extra_callbacks]
        self._call("setup")
        if state is not None:
            self._restore(state)
        self.loss_names: list[str] = list(self.meter.parts)  # named losses seen, in order (the same on every rank)

        train_model: nn.Module = model
        if info.distributed:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if cfg.train.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model

        self.log = JsonlLog(self.output / "log.jsonl", enabled=info.is_main)
        self.steps_log = JsonlLog(self.output / "steps.jsonl", enabled=info.is_main)
        if info.is_main:
            self._prepare_output(delete)
        if state is not None:
            # an epoch whose evaluation is pending has no log line yet (it comes after the evaluation)
            done_epochs, step = self.epoch - (self.pending is not None), self.step
            logged_steps = (self.epoch, step)
            # (and without the final report of a finished run: a run resumed to more epochs reports again at its end)
            self.log.keep_only(lambda r: int(r.get("epoch", 0)) <= done_epochs and "report" not in r)
            self.steps_log.keep_only(lambda r: (int(r.get("epoch", 1)) - 1, int(r.get("step", 0))) < logged_steps)
        if info.is_main:
            try:
                self.output.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(self.output / CONFIG, e) or e from None
            save_config(cfg, self.output / CONFIG)

    def _resume_budget(self, state: dict[str, Any] | None) -> Budget | None:
        """The run's time budget (None without one); resumed, what it had spent and the epoch count it chose, which
        then replaces ``train.epochs`` (the budget was spent choosing it)."""
        minutes = self.cfg.train.time_budget
        if minutes is None:
            return None
        recorded = (state or {}).get("budget")
        budget = Budget.from_state(recorded) if isinstance(recorded, dict) else Budget(minutes)
        budget.minutes = float(minutes)
        if budget.epochs is not None:
            self.cfg.train.epochs = budget.epochs
        return budget

    def _build_scheduler(self) -> Any:

        s = self.cfg.sched
        epochs = self.cfg.train.epochs
        try:
            scheduler, _ = create_scheduler_v2(
                self.optimizer,
                sched=s.name,
                num_epochs=epochs,
                warmup_epochs=s.warmup_epochs,
                warmup_lr=s.warmup_lr,
                min_lr=s.min_lr,
                cooldown_epochs=s.cooldown_epochs,
                decay_milestones=[m if m >= 0 else epochs + m for m in s.decay_milestones],
                decay_rate=s.decay_rate,
                step_on_epochs=s.step_on_epochs,
                updates_per_epoch=self.steps,
            )
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"cannot build schedule {s.name!r} ({e}): use e.g. sched.name cosine") from None
        if scheduler is None:
            raise ConfigError(f"unknown schedule {s.name!r}: use cosine, step, multistep, plateau, poly or tanh")
        return scheduler

    def _restore(self, state: dict[str, Any]) -> None:
        path = self.resume
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(
                f"{path} does not fit this model/optimizer ({first}): resume with the config it was trained with"
            ) from None
        if int(state["config"]["train"]["epochs"]) == self.cfg.train.epochs:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.updates = int(state["epoch"]), int(state["step"]), int(state["updates"])
        # timm schedules are functions of (epoch, update): setting them here gives the uninterrupted run's lr, and
        # the new schedule's when --epochs was changed
        self.scheduler.step(self.epoch)
        self.scheduler.step_update(num_updates=self.updates)
        self.meter.load(state["meter"])
        pending = state.get("pending_eval")
        self.pending = {"lr": float(pending["lr"]), "evaluate": True} if pending else None
        self._call("on_load_checkpoint", state)
        restore_rng(state["rng"])
        where = f"epoch {self.epoch + 1}, step {self.step}"
        if self.pending is not None:
            where = f"the evaluation of epoch {self.epoch}"
        self._say(f"resumed from {path}: {where} (optimizer update {self.updates})")

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "updates": self.updates,
            "meter": self.meter.state(),
            "rng": capture_rng(),
            "config": config_to_dict(self.cfg),
            "task": self.task.state(),
            "world_size": self.info.world_size,
            "threads": torch.get_num_threads(),  # a resume takes the same count: the same float rounding
            "budget": self.budget.state() if self.budget is not None else None,
            "rapidnet": self.task.metadata(self.model),
            # the epoch's steps are done but its evaluation is not: a resume evaluates first (and logs the epoch)
            "pending_eval": {"lr": self.pending["lr"]} if self.pending and self.pending["evaluate"] else None,
        }
        self._call("on_save_checkpoint", state)
        return state

    def _save_last(self) -> Path:
        """Write ``last.pt`` (rank 0), then wait for it so no process runs ahead of a half-written checkpoint."""
        path = self.last_path
        if self.info.is_main:
            save_training_state(path, self._state())
        barrier(self.info)
        return path

    def _pick_threads(self, state: dict[str, Any] | None) -> ThreadGovernor | None:
        """On a CPU, train on the cores other processes leave free (``engine/cpu_share``), or on the count a resumed
        run recorded; returns the governor that keeps watching (None where nothing is to decide)."""
        info, most = self.info, torch.get_num_threads()
        if info.device.type != "cpu" or info.distributed:
            return None
        recorded = (state or {}).get("threads")
        if isinstance(recorded, int) and recorded >= 1:
            threads, others = min(recorded, most), 0.0
        else:
            threads, others = free_threads(most) if most > 1 else (1, 0.0)
        torch.set_num_threads(threads)
        governor = ThreadGovernor(most, time.perf_counter())
        governor.threads, governor.others = threads, others
        if threads < most and not isinstance(recorded, int):
            self._say(
                f"note: other processes are using {others:.1f} cores: training on {threads} of {most} threads, "
                "kept for the whole run (and by --resume) so that results stay reproducible (train.adapt_threads)"
            )
        return governor if most > 1 else None

    def _threads_note(self) -> str:
        g = self.governor
        assert g is not None
        busy = f"other processes are now using {g.others:.1f} cores"
        if g.threads < torch.get_num_threads():
            return f"note: {busy}: this run keeps {torch.get_num_threads()} threads and will be slower"
        return f"note: {busy}: this run keeps {torch.get_num_threads()} threads ({g.threads} would be free)"

    # ---- the loop -----------------------------------------------------------------------------------------------

    def _fit(self, info: DistInfo) -> FitResult:
        try:
            self._build(info)
            result = self._run()
            self._call("on_fit_end", result)
            return result
        finally:
            self._call("teardown")

    def _run(self) -> FitResult:
        train = self.cfg.train  # train.epochs may change once, when a time budget fixes it
        self._announce()
        self._call("on_fit_start")
        last_record: dict[str, Any] | None = None
        with _StopRequest(announce=self.info.is_main) as stop:
            self.stop = stop
            while self.epoch < train.epochs or self.pending is not None:
                if self.pending is None:  # else resumed between an epoch's steps and its evaluation
                    if self._train_epoch():
                        return self._interrupted()
                    self._close_epoch()
                last_record = self._end_epoch()
                if self.epoch < train.epochs and self._agree(stop.signum is not None):
                    return self._interrupted()
        notes = self.task.finish()
        for note in notes:
            self._say(note)
        if self.best is not None:
            b = self.best
            name = self.task.metric_names.get(b["metric"], b["metric"])
            self._say(
                f"done: best {self.task.eval_split} {name} {b['value']:.2f} at epoch {b['epoch']} "
                f"({b['source']} weights); weights {self.output / BEST_WEIGHTS}; log {self.output / 'log.jsonl'}"
            )
        return FitResult("completed", self.output, self.epoch, self.best, last_record, notes=notes)

    def _announce(self) -> None:
        cfg, info = self.cfg, self.info
        lines = format_facts(self.task.summary())
        amp = f"amp {self.ctx.amp_dtype}".replace("torch.", "") if self.ctx.amp else "fp32"
        if cfg.train.amp and not self.ctx.amp:
            amp += " (train.amp is set, but this CPU has no bfloat16 kernels, AVX-512 or AMX, to run it fast)"
        lines.append(
            f"device {info.device} x {info.world_size} process(es), {amp}"
            + (", channels_last" if cfg.train.channels_last else "")
            + (", torch.compile" if cfg.train.compile else "")
        )
        lines.append(
            f"{cfg.optim.opt} lr {self.lr:.3g} ({self.lr_note}), wd {cfg.optim.weight_decay:g}, {cfg.sched.name} "
            f"schedule, warm-up {cfg.sched.warmup_epochs:g} epoch(s); {self._epochs_text()} of {self.steps} steps"
            + (f", EMA {cfg.ema.decay:g}" if cfg.ema.enabled else "")
        )
        board = next((c for c in self.callbacks if isinstance(c, TensorBoard)), None)
        lines.append(f"output {self.output}" + (f" (TensorBoard: {board.folder}/)" if board is not None else ""))
        for line in lines:
            self._say(line)

    def _epochs_text(self) -> str:
        epochs, budget = self.cfg.train.epochs, self.budget
        if budget is None or budget.epochs is not None:
            return f"{epochs} epochs" + (f" (fitted to {budget.minutes:g} min)" if budget is not None else "")
        return f"up to {epochs} epochs, as many as fit in {budget.minutes:g} min (train.time_budget)"

    def _agree(self, flag: bool) -> bool:
        """True on every process when any process says so (one collective; free on one process)."""
        if not self.info.distributed:
            return flag
        return all_reduce_sum(self.info, [float(flag)])[0] > 0

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; True when stopped by a signal (``last.pt`` then saved)."""

        cfg, info, task = self.cfg, self.info, self.task
        epoch, epochs, steps = self.epoch, cfg.train.epochs, self.steps
        if self.step == 0:
            self.meter = _Meter()
        self.train_model.train()
        self._call("on_train_epoch_start")
        disable: bool | None = None  # None: tqdm shows the bar only on a terminal
        if not info.is_main or self.progress is not None:
            disable = not info.is_main or not self.progress
        bar = tqdm(
            total=steps,
            initial=self.step,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=disable,
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
        )
        clip = cfg.optim.clip_grad
        tick = time.perf_counter()
        window_samples, window_start = 0.0, tick
        try:
            for batch in task.train_batches(epoch, self.step):
                step = self.step
                seed_step(cfg.train.seed, epoch, step, info.rank)
                with self.ctx.autocast():
                    out = task.train_step(self.train_model, batch)
                if out is None and info.distributed:
                    raise DataError(
                        f"epoch {epoch + 1} step {step}: a whole batch was unusable (every image unreadable); "
                        "remove the unreadable files"
                    )
                loss_value = float(out.loss.detach().float()) if out is not None else 0.0
                samples = float(out.num_samples) if out is not None else 0.0
                finite = math.isfinite(loss_value)
                sums = [loss_value * samples if finite else 0.0, samples, float(self.stop.signum is not None)]
                sums.append(0.0 if finite else 1.0)
                sums += self._part_sums(out.losses if out is not None else {}, samples)
                if info.distributed:
                    sums = all_reduce_sum(info, sums)
                if sums[3] > 0:
                    raise self._nonfinite(epoch, step, loss_value)
                if out is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(out.loss).backward()
                    if clip is not None:
                        self.scaler.unscale_(self.optimizer)
                        nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.updates += 1
                    self.scheduler.step_update(num_updates=self.updates)
                    self._call("on_optimizer_step")
                now = time.perf_counter()
                if self.governor is not None and self.governor.poll(now) is not None:
                    self._say(self._threads_note())
                self.meter.loss_sum += sums[0]
                self.meter.samples += sums[1]
                self.meter.time += now - tick
                self.meter.steps += 1
                parts = self._add_parts(sums[4:])
                window_samples += sums[1]
                tick = now
                self.step = step + 1
                lr = self.optimizer.param_groups[0]["lr"]
                record: dict[str, Any] | None = None
                if step % cfg.train.log_interval == 0 or self.step == steps:
                    global_loss = sums[0] / sums[1] if sums[1] else float("nan")
                    rate = window_samples / max(now - window_start, 1e-9)
                    record = {
                        "epoch": epoch + 1,
                        "step": step,
                        "update": self.updates,
                        "loss": global_loss,
                        **{loss_key(name): value for name, value in parts.items()},
                        "lr": lr,
                        "img_per_s": round(rate, 2),
                        **({"other_cores": round(self.governor.others, 2)} if self.governor is not None else {}),
                    }
                    self.steps_log.append(record)
                    window_samples, window_start = 0.0, now
                postfix = OrderedDict(loss=f"{self.meter.loss:.4f}")
                postfix.update((_short_loss(k), f"{v:.3f}") for k, v in self.meter.losses.items())
                postfix.update(lr=f"{lr:.2e}", img_s=f"{self.meter.rate:.0f}")
                bar.set_postfix(ordered_dict=postfix, refresh=False)
                bar.update(1)
                self._call("on_train_step_end", record)
                if sums[2] > 0:
                    path = self._save_last()
                    self._say(f"saved {path} at epoch {epoch + 1}, step {self.step}/{steps}")
                    return True
        finally:
            bar.close()
        return False

    def _part_sums(self, losses: dict[str, Any], samples: float) -> list[float]:
        """``[value x samples, samples]`` per named loss seen so far (0, 0 where this step has none): reduced with the
        total in the step's one collective, so every rank must return the same names in the same order."""
        for name in losses:
            if name not in self.loss_names:
                self.loss_names.append(name)
        values = dict(zip(losses, _floats(losses.values()), strict=True))
        sums: list[float] = []
        for name in self.loss_names:
            value = values.get(name)
            if value is None:
                sums += [0.0, 0.0]
            else:
                sums += [value * samples if math.isfinite(value) else 0.0, samples]
        return sums

    def _add_parts(self, sums: Sequence[float]) -> dict[str, float]:
        """Add a step's reduced named-loss sums to the meter; return the step's (global) mean of each."""
        step: dict[str, float] = {}
        for i, name in enumerate(self.loss_names):
            total, samples = sums[2 * i], sums[2 * i + 1]
            if samples > 0:
                part = self.meter.parts.setdefault(name, [0.0, 0.0])
                part[0] += total
                part[1] += samples
                step[name] = total / samples
        return step

    def _nonfinite(self, epoch: int, step: int, value: float) -> NonFiniteLossError:
        last = self.last_path
        kept = f"{last} (epoch {self._saved_epoch(last)}) is kept" if last.exists() else "no checkpoint was written yet"
        return NonFiniteLossError(
            f"loss is {'nan' if math.isnan(value) else value} at epoch {epoch + 1}, step {step} "
            f"(optimizer update {self.updates + 1}): training stopped before applying it; {kept}; "
            "try a lower --lr, --clip-grad 1.0, or no --amp"
        )

    def _saved_epoch(self, path: Path) -> str:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return f"{int(state['epoch'])}, step {int(state['step'])}" if state["step"] else str(int(state["epoch"]))
        except Exception:
            return "?"

    def _evaluates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (1-based) ends with an evaluation: every ``train.eval_interval``, and the last."""
        return self._evaluates_in(epoch, self.cfg.train.epochs)

    def _close_epoch(self) -> None:
        """After the epoch's steps: schedule, ``on_train_epoch_end``, then save ``last.pt`` at once, before any
        evaluation can fail (an unreadable validation image must not cost the epoch's training)."""
        epoch = self.epoch
        lr = self.optimizer.param_groups[0]["lr"]  # after the last update (timm logs it so), before the epoch step
        self.scheduler.step(epoch + 1)
        self._call("on_train_epoch_end")
        self.epoch, self.step = epoch + 1, 0
        self.pending = {"lr": lr, "evaluate": self._evaluates(epoch + 1)}
        if self.budget is not None:
            self.budget.train_s += self.meter.time
            if self.budget.epochs is None and not self.pending["evaluate"] and self._first_evaluation_too_late():
                self.pending["evaluate"] = True
        self._save_last()

    def _first_evaluation_too_late(self) -> bool:
        """Whether the epochs up to a budgeted run's first planned evaluation would alone pass the budget, at the
        mean epoch so far. Then this epoch is evaluated instead, so that the count is fixed before it is too late
        (a slow CPU: 20-minute Mask R-CNN epochs against an evaluation every second one and a 30-minute budget)."""
        budget, done, most = self.budget, self.epoch, self.cfg.train.epochs
        assert budget is not None
        first = next(e for e in range(done + 1, most + 1) if self._evaluates_in(e, most))
        train_s = budget.train_s
        if self.info.distributed:  # every process decides alike, on the mean of their clocks
            train_s = all_reduce_sum(self.info, [train_s])[0] / self.info.world_size
        if not budget.passed_before(first, done, train_s):
            return False
        self._say(
            f"time budget {budget.minutes:g} min: {first} epochs would pass it here before the first planned "
            f"evaluation (epoch {first}), so epoch {done} is evaluated now to fix the count"
        )
        return True

    def _end_epoch(self) -> dict[str, Any]:
        """Evaluate when due (the model, then what callbacks add, e.g. the EMA) and save ``last.pt`` again with the
        new best; callbacks (best checkpoint, export, TensorBoard); log; return the record. Runs after
        :meth:`_close_epoch`, or first thing after resuming from a ``last.pt`` saved before its evaluation."""
        task, pending = self.task, self.pending
        assert pending is not None
        t0 = time.perf_counter()
        results: dict[str, dict[str, float]] = {}
        if pending["evaluate"]:
            results["model"] = task.evaluate(self.model)
            self._call("on_evaluate", results)
        eval_time = time.perf_counter() - t0
        self.pending = None
        if pending["evaluate"]:
            if self.budget is not None:
                self._spend_on_evaluation(eval_time)
            self._save_last()  # the evaluation's outcome (best so far, RNG states) for an exact resume

        epoch = self.epoch
        key, best, split = task.primary_metric, self.best, task.eval_split
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": self.updates,
            "train_loss": self.meter.loss,
            **{f"train_{loss_key(name)}": value for name, value in self.meter.losses.items()},
            **{
                (f"{split}_{k}" if source == "model" else f"{source}_{split}_{k}"): v
                for source, metrics in results.items()
                for k, v in metrics.items()
            },
            "lr": pending["lr"],
            "img_per_s": round(self.meter.rate, 2),
            "train_time": round(self.meter.time, 3),
            "eval_time": round(eval_time, 3),
            "epoch_time": round(self.meter.time + eval_time, 3),
            f"best_{key}": best["value"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            **task.epoch_stats(),
        }
        left = self._time_left(eval_time if pending["evaluate"] else None)
        if left is not None:
            record["eta_s"] = round(left, 1)
        self._call("on_epoch_end", record)
        self.log.append(record)
        self._say(self._epoch_line(record, results))
        if left is not None:
            more = self.cfg.train.epochs - epoch
            self._say(
                f"epoch {epoch} took {format_duration(record['epoch_time'])}; about {format_duration(left)} left "
                f"for {more} more epoch{'s' if more != 1 else ''}"
            )
        self.epochs_finished += 1
        return record

    def _spend_on_evaluation(self, seconds: float) -> None:
        """Count an evaluation against the budget; after the first, fix the epoch count (every process alike: they
        choose from the times averaged over processes) and refit the schedule to it."""
        budget = self.budget
        assert budget is not None
        budget.eval_s += seconds
        budget.evaluations += 1
        if budget.epochs is not None:
            return
        train = self.cfg.train
        spent = [budget.train_s, budget.eval_s]
        if self.info.distributed:
            spent = [v / self.info.world_size for v in all_reduce_sum(self.info, spent)]
        measured = Budget(budget.minutes, *spent, budget.evaluations)
        most = train.epochs
        budget.epochs = measured.choose(self.epoch, most, self._evaluates_in)
        epoch_s, eval_s = measured.means(self.epoch)
        total_s = sum(spent) + remaining_s(self.epoch, budget.epochs, epoch_s, eval_s, self._evaluates_in)
        self._say(
            f"time budget {budget.minutes:g} min: an epoch takes {format_duration(epoch_s)} and an evaluation "
            f"{format_duration(eval_s)} here, so the run takes {budget.epochs} of up to {most} epochs "
            f"(about {format_duration(total_s)}); the schedule follows (--epochs N sets them yourself)"
        )
        if budget.epochs != most:
            train.epochs = budget.epochs
            self.scheduler = self._build_scheduler()
            self.scheduler.step(self.epoch)
            self.scheduler.step_update(num_updates=self.updates)
        if self.info.is_main:
            save_config(self.cfg, self.output / CONFIG)

    def _evaluates_in(self, epoch: int, total: int) -> bool:
        """Whether epoch ``epoch`` is evaluated in a run of ``total`` epochs."""
        return epoch % self.cfg.train.eval_interval == 0 or epoch >= total

    def _time_left(self, eval_time: float | None) -> float | None:
        """After the first epoch this process ends, the seconds the remaining epochs should take: each trains as
        long as this one did and each evaluated one adds this evaluation's time (None: not the first epoch, nothing
        left, or a time budget that has not fixed the count yet)."""
        epochs = self.cfg.train.epochs
        if self.epochs_finished or self.epoch >= epochs or (self.budget is not None and self.budget.epochs is None):
            return None
        return remaining_s(self.epoch, epochs, self.meter.time, eval_time or 0.0, self._evaluates_in)

    def _epoch_line(self, record: dict[str, Any], results: dict[str, dict[str, float]]) -> str:
        names = self.task.metric_names
        text = f"epoch {record['epoch']}/{self.cfg.train.epochs}  train loss {record['train_loss']:.4f}"
        parts = self.meter.losses
        if parts:
            text += " (" + ", ".join(f"{_short_loss(k)} {v:.4f}" for k, v in parts.items()) + ")"
        metrics = results.get("model")
        text += (
            f"  {self.task.eval_split} {format_metrics(metrics, names)}"
            if metrics
            else f"  (evaluated every {self.cfg.train.eval_interval} epochs)"
        )
        for source, other in results.items():
            if source != "model":
                text += f"  | {source} {format_metrics(other, names)}"
        text += f"  lr {record['lr']:.2e}  {record['img_per_s']:.0f} img/s  {record['epoch_time']:.1f} s"
        best = self.best
        return text + ("  *best*" if best is not None and best["epoch"] == record["epoch"] else "")

    def _interrupted(self) -> FitResult:
        signum = self.stop.signum or signal.SIGINT
        last = self.last_path
        where = f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"the end of epoch {self.epoch}"
        self._say(
            f"stopped by {signal.Signals(signum).name} at {where}: state saved to {last}; "
            f"continue with: rapidnet train --resume {last}"
        )
        return FitResult("interrupted", self.output, self.epoch, self.best, signal=int(signum))
