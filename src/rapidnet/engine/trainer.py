"""The training loop every task shares: ``Trainer(task, cfg).fit()``.

One process or many (torchrun, DDP), CPU or CUDA, AMP (bfloat16 autocast on CPU, float16 + GradScaler on CUDA),
channels_last, torch.compile, gradient clipping, a timm optimizer and schedule; per epoch a ``last.pt`` written
atomically; ``log.jsonl`` per epoch and ``steps.jsonl`` every few steps, with every named loss a step returns
(``StepOutput.losses``) beside the total; tqdm bars on rank 0. Per-epoch metrics are logged under the task's
``eval_split`` (``val_top1``, ``dev_bbox_AP``).

The trainer runs the loop; the rest is handed to collaborators with a public interface, and what varies with the
recipe to callbacks (:mod:`rapidnet.engine.hooks` says which hook runs when, and what a callback may read):

- :mod:`~rapidnet.engine.run_folder`: the run folder's lock (one training process per folder) and the guard that
  refuses to write over another run unless ``force=True`` (``--force``);
- :mod:`~rapidnet.engine.checkpointer`: ``last.pt`` and ``resume=PATH``, which restores everything (weights, EMA,
  optimizer, scheduler, scaler, position, the epoch's running loss sums, RNG states, callback states) and refuses a
  checkpoint of another model or recipe; per-sample and per-step seeding (:mod:`~rapidnet.engine.seeding`) makes
  the following losses identical to an uninterrupted run's on CPU;
- :mod:`~rapidnet.engine.console` (lines and bars), :mod:`~rapidnet.engine.budget` (``train.time_budget``),
  :mod:`~rapidnet.engine.cpu_share` (the thread count on a shared CPU), :mod:`~rapidnet.engine.stop` (signals);
- :mod:`~rapidnet.engine.callbacks`: EMA, BN-statistics averaging under DDP, ``best.pt`` and the exported best
  weights, the final report on the task's ``report_split``, TensorBoard event files.

How a run ends: SIGINT/SIGTERM finish the current step, every process stops at the same step, ``last.pt`` is saved
and ``fit`` returns ``status="interrupted"``; a NaN/inf loss stops the run before the bad gradient is applied and
raises a one-line :class:`NonFiniteLossError`; at an epoch end ``last.pt`` is written before the evaluation (then
again after it, with the new best), so a failing evaluation loses no training: resuming redoes the evaluation.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rapidnet.config import Config, scaled_lr
from rapidnet.engine.budget import TimeBudget, epochs_text, time_left
from rapidnet.engine.callbacks import default_callbacks
from rapidnet.engine.checkpointer import MAY_DIFFER_ON_RESUME, nonfinite_message, read_resume_state, restore, save_last
from rapidnet.engine.console import Console, format_duration, format_facts, format_metrics
from rapidnet.engine.conv_taps import trim_padding_taps_
from rapidnet.engine.cpu_share import pick_threads
from rapidnet.engine.distributed import DistInfo, all_reduce_sum, cleanup_distributed, init_distributed
from rapidnet.engine.hooks import Callback, FitResult
from rapidnet.engine.meter import EpochMeter, LossNames, loss_key
from rapidnet.engine.run_folder import BEST, BEST_WEIGHTS, LAST, LOG, RUN_FILES, STEPS_LOG, RunFolder
from rapidnet.engine.runlog import JsonlLog
from rapidnet.engine.schedule import build_scheduler
from rapidnet.engine.seeding import seed_everything, seed_step
from rapidnet.engine.stop import StopRequest
from rapidnet.engine.task import RunContext, Task
from rapidnet.errors import DataError, RapidNetError
from rapidnet.utils import cpu_has_bfloat16

__all__ = [
    "BEST",
    "BEST_WEIGHTS",
    "LAST",
    "MAY_DIFFER_ON_RESUME",
    "RUN_FILES",
    "FitResult",
    "NonFiniteLossError",
    "Trainer",
    "format_duration",
    "format_facts",
    "format_metrics",
    "loss_key",
]


class NonFiniteLossError(RapidNetError, FloatingPointError):
    """The loss became NaN or infinite; the run stopped before applying the step."""


class Trainer:
    """Runs a :class:`~rapidnet.engine.task.Task` with the engine sections of a :class:`~rapidnet.config.Config`.

    Args:
        task: builds data, model, loss and metrics.
        cfg: the resolved configuration (``train``, ``optim``, ``sched`` and ``ema`` are read here).
        resume: a ``last.pt``/``best.pt`` of this run to continue from.
        force: replace a run already in ``train.output`` (a new run there, or a resume of another run into it):
            its files (:data:`RUN_FILES`, TensorBoard events) are deleted first; without it that is a one-line error.
            A folder another process is training in is refused either way.
        progress: show tqdm bars (None: when stderr is a terminal).
        callbacks: more :class:`~rapidnet.engine.hooks.Callback` s, called after the defaults that ``cfg`` asks
            for (:func:`~rapidnet.engine.callbacks.default_callbacks`).

    While fitting, the trainer is the :class:`~rapidnet.engine.hooks.TrainerAPI` its callbacks receive.
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
        #: the best result so far (``{"metric", "value", "epoch", "source"}``), set by the selecting BestCheckpoint
        self.best: dict[str, Any] | None = None
        self.budget: TimeBudget | None = None

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
    def last_path(self) -> Path:
        return self.output / LAST

    def say(self, text: str) -> None:
        """Print a line (rank 0), between progress bars."""
        self.console.say(text)

    # ---- setup --------------------------------------------------------------------------------------------------

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _fit(self, info: DistInfo) -> FitResult:
        self.info = info
        self.output = Path(self.cfg.train.output)
        self.console = Console(info.is_main, self.progress)
        self.folder = RunFolder(self.output, self.resume, self.force, info, self.say)
        self.folder.acquire()  # first: nothing is read or written in a folder another process trains in
        try:
            try:
                self._build()
                result = self._run()
                self._call("on_fit_end", result)
                return result
            finally:
                self._call("teardown")
        finally:
            self.folder.release()

    def _build(self) -> None:
        cfg, info, task = self.cfg, self.info, self.task
        state = None  # read first: a bad checkpoint is refused before any file of the run folder is touched
        if self.resume is not None:
            state = read_resume_state(self.resume, cfg, info.world_size, self.say)
        self.budget = TimeBudget.resumed(cfg.train.time_budget, state, info, self._evaluates, self.say)
        if self.budget is not None and self.budget.epochs is not None:
            cfg.train.epochs = self.budget.epochs  # the count a resumed budget chose
        delete = self.folder.check()
        # bfloat16 autocast is a speed setting: where the CPU would emulate it (14x slower here), fp32 is the fast one
        amp = cfg.train.amp and (info.device.type != "cpu" or cpu_has_bfloat16())
        self.ctx = RunContext(cfg=cfg, dist=info, output=self.output, amp=amp, channels_last=cfg.train.channels_last)
        seed_everything(cfg.train.seed)
        task.setup(self.ctx)
        model = task.build_model()
        if state is not None:
            task.check_state(state.get("task", {}), str(self.resume))
        task.build_loaders()
        model.to(info.device)
        if info.distributed and cfg.train.sync_bn:
            if info.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self.say("note: SyncBatchNorm needs CUDA; on CPU each process normalises over its own batch")
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.train.trim_padding_taps and info.device.type == "cpu":
            trim_padding_taps_(model)
        self.governor = None
        if cfg.train.adapt_threads:
            recorded = (state or {}).get("threads")
            self.governor = pick_threads(info.device, info.distributed, recorded, time.perf_counter(), self.say)
        self.model = model
        self.weights: dict[str, nn.Module] = {"model": model}

        self.steps = task.steps_per_epoch()
        if self.steps < 1:
            raise DataError(
                f"the training set gives no full batch of {task.batch_size} per process "
                f"({info.world_size} process(es)): lower --batch-size or use more data"
            )
        global_batch = task.batch_size * info.world_size
        o = cfg.optim
        self.lr = scaled_lr(o, global_batch)
        self.lr_note = "set" if o.lr is not None else f"{o.base_lr:g} x {global_batch}/{o.lr_base_size}"
        self.optimizer = task.build_optimizer(model, self.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=amp and info.device.type == "cuda")

        self.epoch, self.step, self.updates = 0, 0, 0
        self.meter = EpochMeter()
        self.best = None
        self.callbacks = [*default_callbacks(self), *self.extra_callbacks]
        self._call("setup")
        if state is not None:
            restore(self, state)
        self.loss_names = LossNames(self.meter.parts)  # named losses seen, in order (the same on every rank)

        train_model: nn.Module = model
        if info.distributed:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if cfg.train.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model

        self.log = JsonlLog(self.output / LOG, enabled=info.is_main)
        self.steps_log = JsonlLog(self.output / STEPS_LOG, enabled=info.is_main)
        if info.is_main:
            self.folder.prepare(delete)
        if state is not None:
            # an epoch whose evaluation is pending has no log line yet (it comes after the evaluation)
            self.folder.rewind_logs(
                self.log, self.steps_log, self.epoch - (self.pending is not None), (self.epoch, self.step)
            )
        self.folder.save_config(cfg)

    def _evaluates(self, epoch: int, total: int) -> bool:
        """Whether epoch ``epoch`` (1-based) is evaluated in a run of ``total`` epochs: every
        ``train.eval_interval``, and the last."""
        return epoch % self.cfg.train.eval_interval == 0 or epoch >= total

    # ---- the loop -----------------------------------------------------------------------------------------------

    def _run(self) -> FitResult:
        train = self.cfg.train  # train.epochs may change once, when a time budget fixes it
        self._announce()
        self._call("on_fit_start")
        last_record: dict[str, Any] | None = None
        with StopRequest(announce=self.info.is_main) as stop:
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
            self.say(note)
        if self.best is not None:
            b = self.best
            name = self.task.metric_names.get(b["metric"], b["metric"])
            self.say(
                f"done: best {self.task.eval_split} {name} {b['value']:.2f} at epoch {b['epoch']} "
                f"({b['source']} weights); weights {self.output / BEST_WEIGHTS}; log {self.output / LOG}"
            )
        return FitResult("completed", self.output, self.epoch, self.best, last_record, notes=notes)

    def _announce(self) -> None:
        cfg = self.cfg
        recipe = (
            f"{cfg.optim.opt} lr {self.lr:.3g} ({self.lr_note}), wd {cfg.optim.weight_decay:g}, {cfg.sched.name} "
            f"schedule, warm-up {cfg.sched.warmup_epochs:g} epoch(s); {epochs_text(cfg.train.epochs, self.budget)} "
            f"of {self.steps} steps" + (f", EMA {cfg.ema.decay:g}" if cfg.ema.enabled else "")
        )
        notes = [note for note in (c.output_note() for c in self.callbacks) if note]
        self.console.opening(self.task.summary(), cfg, self.ctx, self.info.world_size, recipe, self.output, notes)

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
            self.meter = EpochMeter()
        self.train_model.train()
        self._call("on_train_epoch_start")
        bar = self.console.bar(steps, self.step, f"epoch {epoch + 1}/{epochs}")
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
                sums += self.loss_names.sums(out.losses if out is not None else {}, samples)
                if info.distributed:
                    sums = all_reduce_sum(info, sums)
                if sums[3] > 0:
                    message = nonfinite_message(self.last_path, epoch, step, self.updates + 1, loss_value)
                    raise NonFiniteLossError(message)
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
                    self.say(self.governor.note())
                self.meter.loss_sum += sums[0]
                self.meter.samples += sums[1]
                self.meter.time += now - tick
                self.meter.steps += 1
                parts = self.loss_names.add(self.meter, sums[4:])
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
                bar.set_postfix(ordered_dict=Console.step_postfix(self.meter, lr), refresh=False)
                bar.update(1)
                self._call("on_train_step_end", record)
                if sums[2] > 0:
                    path = save_last(self)
                    self.say(f"saved {path} at epoch {epoch + 1}, step {self.step}/{steps}")
                    return True
        finally:
            bar.close()
        return False

    def _close_epoch(self) -> None:
        """After the epoch's steps: schedule, ``on_train_epoch_end``, then save ``last.pt`` at once, before any
        evaluation can fail (an unreadable validation image must not cost the epoch's training)."""
        epoch = self.epoch
        lr = self.optimizer.param_groups[0]["lr"]  # after the last update (timm logs it so), before the epoch step
        self.scheduler.step(epoch + 1)
        self._call("on_train_epoch_end")
        self.epoch, self.step, most = epoch + 1, 0, self.cfg.train.epochs
        self.pending = {"lr": lr, "evaluate": self._evaluates(epoch + 1, most)}
        if self.budget is not None and self.budget.after_training(self.meter.time, self.epoch, most):
            self.pending["evaluate"] = True  # a budget that must fix its count before the first planned evaluation
        save_last(self)

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
            if self.budget is not None and self.budget.after_evaluation(eval_time, self.epoch, self.cfg.train.epochs):
                self._fit_schedule_to_budget()
            save_last(self)  # the evaluation's outcome (best so far, RNG states) for an exact resume

        epoch, epochs = self.epoch, self.cfg.train.epochs
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
        left = None  # after the first epoch this process ends: how long the rest should take
        if not self.epochs_finished:
            eval_s = eval_time if pending["evaluate"] else None
            left = time_left(epoch, epochs, self.meter.time, eval_s, self._evaluates, self.budget)
        if left is not None:
            record["eta_s"] = round(left, 1)
        self._call("on_epoch_end", record)
        self.log.append(record)
        eval_interval, names = self.cfg.train.eval_interval, task.metric_names
        self.say(Console.epoch_line(record, results, self.meter, epochs, split, names, eval_interval, self.best))
        if left is not None:
            more = epochs - epoch
            self.say(
                f"epoch {epoch} took {format_duration(record['epoch_time'])}; about {format_duration(left)} left "
                f"for {more} more epoch{'s' if more != 1 else ''}"
            )
        self.epochs_finished += 1
        return record

    def _fit_schedule_to_budget(self) -> None:
        """The time budget has just fixed the epoch count: the schedule follows it, and the config records it."""
        assert self.budget is not None and self.budget.epochs is not None
        if self.budget.epochs != self.cfg.train.epochs:
            self.cfg.train.epochs = self.budget.epochs
            self.scheduler = build_scheduler(self.optimizer, self.cfg, self.steps)
            self.scheduler.step(self.epoch)
            self.scheduler.step_update(num_updates=self.updates)
        self.folder.save_config(self.cfg)

    def _interrupted(self) -> FitResult:
        signum = self.stop.signum or signal.SIGINT
        last = self.last_path
        where = f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"the end of epoch {self.epoch}"
        self.say(
            f"stopped by {signal.Signals(signum).name} at {where}: state saved to {last}; "
            f"continue with: rapidnet train --resume {last}"
        )
        return FitResult("interrupted", self.output, self.epoch, self.best, signal=int(signum))
