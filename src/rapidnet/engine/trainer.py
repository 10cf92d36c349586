"""The training loop every task shares: ``Trainer(task, cfg).fit()``.

One process or many (torchrun, DDP), CPU or CUDA, AMP (bfloat16 autocast on CPU, float16 + GradScaler on CUDA),
channels_last, torch.compile, gradient clipping, EMA, a timm optimizer and schedule; per epoch a ``last.pt`` written
atomically, ``best.pt`` and the task's exported best weights; ``log.jsonl`` per epoch and ``steps.jsonl`` every few
steps; tqdm bars on rank 0. Runs are stoppable and exactly resumable at any step:

- SIGINT/SIGTERM: the current step finishes, every process stops at the same step, ``last.pt`` is saved and
  ``fit`` returns ``status="interrupted"`` (a second Ctrl-C aborts at once, keeping the previous ``last.pt``);
- a NaN/inf loss stops the run before the bad gradient is applied, keeps the last good checkpoint and raises a
  one-line :class:`NonFiniteLossError` naming the epoch and step;
- ``resume=PATH`` restores everything (weights, EMA, optimizer, scheduler, scaler, position, RNG states) and
  refuses a checkpoint of another model or recipe; per-sample and per-step seeding (``rapidnet.engine.seeding``)
  makes the following losses identical to an uninterrupted run's on CPU.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rapidnet.config import Config, config_from_dict, config_to_dict, save_config, scaled_lr
from rapidnet.engine.checkpoint import (
    capture_rng,
    check_resume_config,
    copy_checkpoint,
    load_training_state,
    restore_rng,
    save_training_state,
)
from rapidnet.engine.distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, init_distributed
from rapidnet.engine.runlog import JsonlLog
from rapidnet.engine.seeding import seed_everything, seed_step
from rapidnet.engine.task import RunContext, Task
from rapidnet.errors import CheckpointError, ConfigError, DataError, RapidNetError

__all__ = ["BEST", "BEST_WEIGHTS", "LAST", "MAY_DIFFER_ON_RESUME", "FitResult", "NonFiniteLossError", "Trainer"]

LAST = "last.pt"
BEST = "best.pt"
BEST_WEIGHTS = "model_best.safetensors"

#: config keys a resumed run may change: they affect where and how fast it runs, not what it computes
MAY_DIFFER_ON_RESUME = (
    "train.output",
    "train.device",
    "train.compile",
    "train.log_interval",
    "train.epochs",
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

    @property
    def exit_code(self) -> int:
        """0 when completed; 128 + signal number when interrupted (the shell's convention)."""
        return 0 if self.status == "completed" else 128 + int(self.signal or signal.SIGINT)


@dataclass
class _Meter:
    """Running sums of the epoch in progress (saved in checkpoints so a resumed epoch reports the same loss)."""

    loss_sum: float = 0.0
    samples: float = 0.0
    time: float = 0.0
    steps: int = 0

    def state(self) -> dict[str, float]:
        return {"loss_sum": self.loss_sum, "samples": self.samples, "time": self.time, "steps": self.steps}

    def load(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.samples = float(state["loss_sum"]), float(state["samples"])
        self.time, self.steps = float(state["time"]), int(state["steps"])

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else float("nan")

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
        progress: show tqdm bars (None: when stderr is a terminal).
    """

    def __init__(self, task: Task, cfg: Config, resume: str | Path | None = None, progress: bool | None = None) -> None:
        self.task = task
        self.cfg = cfg
        self.resume = Path(resume) if resume is not None else None
        self.progress = progress

    # ---- public -------------------------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train to the configured number of epochs (or until interrupted); return how it ended."""
        info = init_distributed(self.cfg.train.device)
        try:
            return self._fit(info)
        finally:
            if info.distributed:
                cleanup_distributed()

    # ---- setup --------------------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.info.is_main:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def _read_resume_state(self) -> dict[str, Any] | None:
        if self.resume is None:
            last = Path(self.cfg.train.output) / LAST
            if last.exists():
                raise ConfigError(
                    f"output folder {last.parent} already holds a run ({LAST}): continue it with --resume {last}, "
                    "or choose another --output"
                )
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
        state = self._read_resume_state()
        amp = cfg.train.amp
        ctx = RunContext(cfg=cfg, dist=info, output=self.output, amp=amp, channels_last=cfg.train.channels_last)
        self.ctx = ctx
        seed_everything(cfg.train.seed)
        self.task.setup(ctx)
        model = self.task.build_model()
        if state is not None:
            self.task.check_state(state.get("task", {}), str(self.resume))
        model.to(info.device)
        if info.distributed and cfg.train.sync_bn:
            if info.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self._say("note: SyncBatchNorm needs CUDA; on CPU each process normalises over its own batch")
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model

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
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)

        self.epoch, self.step, self.updates = 0, 0, 0
        self.meter = _Meter()
        self.best: dict[str, Any] | None = None
        if state is not None:
            self._restore(state)

        train_model: nn.Module = model
        if info.distributed:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if cfg.train.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model

        self.log = JsonlLog(self.output / "log.jsonl", enabled=info.is_main)
        self.steps_log = JsonlLog(self.output / "steps.jsonl", enabled=info.is_main)
        if state is not None:
            done_epochs, step = self.epoch, self.step
            self.log.keep_only(lambda r: int(r.get("epoch", 0)) <= done_epochs)
            self.steps_log.keep_only(
                lambda r: (int(r.get("epoch", 1)) - 1, int(r.get("step", 0))) < (done_epochs, step)
            )
        if info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output / "config.yaml")

    def _build_scheduler(self) -> Any:
        from timm.scheduler import create_scheduler_v2

        s = self.cfg.sched
        try:
            scheduler, _ = create_scheduler_v2(
                self.optimizer,
                sched=s.name,
                num_epochs=self.cfg.train.epochs,
                warmup_epochs=s.warmup_epochs,
                warmup_lr=s.warmup_lr,
                min_lr=s.min_lr,
                cooldown_epochs=s.cooldown_epochs,
                decay_milestones=list(s.decay_milestones),
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
            if self.ema is not None:
                self.ema.module.load_state_dict(state.get("model_ema") or state["model"])
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
        self.best = state.get("best")
        restore_rng(state["rng"])
        self._say(f"resumed from {path}: epoch {self.epoch + 1}, step {self.step} (optimizer update {self.updates})")

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
            "best": self.best,
            "rng": capture_rng(),
            "config": config_to_dict(self.cfg),
            "task": self.task.state(),
            "world_size": self.info.world_size,
            "rapidnet": self.task.metadata(self.model),
        }
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def _save_last(self) -> Path:
        """Write ``last.pt`` (rank 0), then wait for it so no process runs ahead of a half-written checkpoint."""
        path = self.output / LAST
        if self.info.is_main:
            save_training_state(path, self._state())
        barrier(self.info)
        return path

    # ---- the loop -----------------------------------------------------------------------------------------------

    def _fit(self, info: DistInfo) -> FitResult:
        self._build(info)
        cfg = self.cfg
        epochs = cfg.train.epochs
        self._announce()
        last_record: dict[str, Any] | None = None
        with _StopRequest(announce=info.is_main) as stop:
            self.stop = stop
            while self.epoch < epochs:
                if self._train_epoch():
                    return self._interrupted()
                last_record = self._end_epoch()
                if self.epoch < epochs and self._agree(stop.signum is not None):
                    return self._interrupted()
        notes = self.task.finish()
        for note in notes:
            self._say(note)
        if self.best is not None:
            b = self.best
            self._say(
                f"done: best val {self.task.primary_metric} {b['value']:.2f} at epoch {b['epoch']} "
                f"({b['source']} weights); weights {self.output / BEST_WEIGHTS}; log {self.output / 'log.jsonl'}"
            )
        return FitResult("completed", self.output, self.epoch, self.best, last_record, notes=notes)

    def _announce(self) -> None:
        cfg, info = self.cfg, self.info
        lines = self.task.describe()
        amp = f"amp {self.ctx.amp_dtype}".replace("torch.", "") if cfg.train.amp else "fp32"
        lines.append(
            f"device {info.device} x {info.world_size} process(es), {amp}"
            + (", channels_last" if cfg.train.channels_last else "")
            + (", torch.compile" if cfg.train.compile else "")
        )
        lines.append(
            f"{cfg.optim.opt} lr {self.lr:.3g} ({self.lr_note}), wd {cfg.optim.weight_decay:g}, {cfg.sched.name} "
            f"schedule, warm-up {cfg.sched.warmup_epochs} epoch(s); {cfg.train.epochs} epochs of {self.steps} steps"
            + (f", EMA {cfg.ema.decay:g}" if self.ema is not None else "")
        )
        lines.append(f"output {self.output}")
        for line in lines:
            self._say(line)

    def _agree(self, flag: bool) -> bool:
        """True on every process when any process says so (one collective; free on one process)."""
        if not self.info.distributed:
            return flag
        return all_reduce_sum(self.info, [float(flag)])[0] > 0

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; True when stopped by a signal (``last.pt`` then saved)."""
        from tqdm import tqdm

        cfg, info, task = self.cfg, self.info, self.task
        epoch, epochs, steps = self.epoch, cfg.train.epochs, self.steps
        if self.step == 0:
            self.meter = _Meter()
        self.train_model.train()
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
                    if self.ema is not None:
                        self.ema.update(self.model, step=self.updates)
                now = time.perf_counter()
                self.meter.loss_sum += sums[0]
                self.meter.samples += sums[1]
                self.meter.time += now - tick
                self.meter.steps += 1
                window_samples += sums[1]
                tick = now
                self.step = step + 1
                lr = self.optimizer.param_groups[0]["lr"]
                if step % cfg.train.log_interval == 0 or self.step == steps:
                    global_loss = sums[0] / sums[1] if sums[1] else float("nan")
                    rate = window_samples / max(now - window_start, 1e-9)
                    self.steps_log.append(
                        {
                            "epoch": epoch + 1,
                            "step": step,
                            "update": self.updates,
                            "loss": global_loss,
                            "lr": lr,
                            "img_per_s": round(rate, 2),
                        }
                    )
                    window_samples, window_start = 0.0, now
                bar.set_postfix(
                    loss=f"{self.meter.loss:.4f}", lr=f"{lr:.2e}", img_s=f"{self.meter.rate:.0f}", refresh=False
                )
                bar.update(1)
                if sums[2] > 0:
                    path = self._save_last()
                    self._say(f"saved {path} at epoch {epoch + 1}, step {self.step}/{steps}")
                    return True
        finally:
            bar.close()
        return False

    def _nonfinite(self, epoch: int, step: int, value: float) -> NonFiniteLossError:
        last = self.output / LAST
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

    def _end_epoch(self) -> dict[str, Any]:
        """Schedule, evaluate (model and EMA; every ``train.eval_interval`` epochs and after the last), save
        ``last``/``best``/exported weights, log; return the record."""
        cfg, task = self.cfg, self.task
        epoch = self.epoch
        lr = self.optimizer.param_groups[0]["lr"]  # the last step's, before the schedule moves on
        self.scheduler.step(epoch + 1)
        if self.info.distributed:
            # without SyncBN each process's BN statistics drifted apart: average them so that every process
            # evaluates, and rank 0 saves, the same model
            from timm.utils import distribute_bn

            distribute_bn(self.model, self.info.world_size, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.info.world_size, reduce=True)
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        ema_metrics = None
        if (epoch + 1) % cfg.train.eval_interval == 0 or epoch + 1 >= cfg.train.epochs:
            metrics = task.evaluate(self.model)
            ema_metrics = task.evaluate(self.ema.module) if self.ema is not None and cfg.ema.evaluate else None
        eval_time = time.perf_counter() - t0

        key = task.primary_metric
        better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
        score, source = metrics.get(key, float("nan")), "model"
        if ema_metrics is not None and better(ema_metrics.get(key, float("nan")), score):
            score, source = ema_metrics[key], "ema"
        is_best = math.isfinite(score) and (self.best is None or better(score, self.best["value"]))
        if is_best:
            self.best = {"metric": key, "value": float(score), "epoch": epoch + 1, "source": source}

        self.epoch, self.step = epoch + 1, 0
        path = self._save_last()
        if is_best and self.info.is_main:
            copy_checkpoint(path, self.output / BEST)
            best_model = self.ema.module if source == "ema" and self.ema is not None else self.model
            task.export(best_model, self.output / BEST_WEIGHTS)

        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.updates,
            "train_loss": self.meter.loss,
            **{f"val_{k}": v for k, v in metrics.items()},
            **({f"ema_val_{k}": v for k, v in ema_metrics.items()} if ema_metrics is not None else {}),
            "lr": lr,
            "img_per_s": round(self.meter.rate, 2),
            "train_time": round(self.meter.time, 3),
            "eval_time": round(eval_time, 3),
            "epoch_time": round(self.meter.time + eval_time, 3),
            f"best_{key}": self.best["value"] if self.best else None,
            "best_epoch": self.best["epoch"] if self.best else None,
            **task.epoch_stats(),
        }
        self.log.append(record)
        self._say(self._epoch_line(record, metrics, ema_metrics, is_best))
        return record

    def _epoch_line(
        self, record: dict[str, Any], metrics: dict[str, float], ema: dict[str, float] | None, is_best: bool
    ) -> str:
        fmt = self.task.format_metrics
        text = f"epoch {record['epoch']}/{self.cfg.train.epochs}  train loss {record['train_loss']:.4f}"
        text += f"  val {fmt(metrics)}" if metrics else f"  (evaluated every {self.cfg.train.eval_interval} epochs)"
        if ema is not None:
            text += f"  | ema {fmt(ema)}"
        text += f"  lr {record['lr']:.2e}  {record['img_per_s']:.0f} img/s  {record['epoch_time']:.1f} s"
        return text + ("  *best*" if is_best else "")

    def _interrupted(self) -> FitResult:
        signum = self.stop.signum or signal.SIGINT
        last = self.output / LAST
        where = f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"the end of epoch {self.epoch}"
        self._say(
            f"stopped by {signal.Signals(signum).name} at {where}: state saved to {last}; "
            f"continue with: rapidnet train --resume {last}"
        )
        return FitResult("interrupted", self.output, self.epoch, self.best, signal=int(signum))
