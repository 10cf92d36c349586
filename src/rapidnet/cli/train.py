"""``rapidnet train``: train a classifier with a YAML config and command-line overrides; runs under torchrun as is.

Examples: ``rapidnet train --config configs/fashion_mnist_rapidnet_ti.yaml --output runs/fm``;
``torchrun --nproc_per_node 8 -m rapidnet.cli.main train --config configs/imagenet_rapidnet_ti.yaml --data /imagenet``;
``rapidnet train --resume runs/fm/last.pt`` continues a stopped run exactly (it reuses the checkpoint's config).
An --output folder that holds another run is refused (a new run there, or a resume of another run into it) unless
--force is given, which deletes that run's checkpoints, logs and config first.
A config for another task (``task.name: detection|segmentation``) is refused: ``rapidnet det|seg train`` trains it.
Logs: ``log.jsonl``, ``steps.jsonl`` and, with ``tensorboard`` installed, ``OUTPUT/tensorboard/`` event files.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidnet.cli._args import float_in, int_in
from rapidnet.constants import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_IMAGES,
    MAX_INTERVAL,
    MAX_SEED,
    MAX_SIDE,
    MAX_TIME_BUDGET,
    MAX_WORKERS,
    MIN_SIDE,
)

#: command-line flag (argparse dest) -> config key
FLAG_KEYS: dict[str, str] = {
    "model": "model.name",
    "data": "data.path",
    "epochs": "train.epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "output": "train.output",
    "device": "train.device",
    "workers": "data.workers",
    "amp": "train.amp",
    "channels_last": "train.channels_last",
    "compile": "train.compile",
    "seed": "train.seed",
    "teacher": "distill.teacher",
    "teacher_checkpoint": "distill.teacher_checkpoint",
    "distillation": "distill.type",
    "skip_corrupt": "data.skip_corrupt",
    "limit_train": "data.limit_train",
    "limit_val": "data.limit_val",
    "input_size": "data.input_size",
    "clip_grad": "optim.clip_grad",
    "ema": "ema.enabled",
    "pipeline": "data.pipeline",
    "log_interval": "train.log_interval",
    "eval_interval": "train.eval_interval",
    "time_budget": "train.time_budget",
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a classifier (YAML config + overrides; works under torchrun)", description=__doc__
    )
    add_train_options(
        p,
        config_help="YAML config (configs/*.yaml); default: the built-in defaults (the paper's "
        "recipe, no teacher, on Fashion-MNIST), or with --resume the checkpoint's own config",
        data_help="'fashion-mnist', a folder with the Fashion-MNIST IDX files, or an ImageFolder root with train/ "
        "and val/",
    )
    return p


def add_train_options(
    p: argparse.ArgumentParser, config_help: str, data_help: str, classification: bool = True
) -> argparse.ArgumentParser:
    """The options of ``rapidnet train``; ``classification=False`` leaves out the classification-only ones
    (teacher, distillation, input size, pipeline, --skip-corrupt), for the dense ``det|seg train`` commands."""
    p.add_argument("--config", help=config_help)
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its last.pt (or best.pt)")
    p.add_argument("--model", help="RapidNet variant (rapidnet_ti|s|m|b) or any timm model name")
    p.add_argument("--data", help=data_help)
    p.add_argument(
        "--epochs",
        type=int_in(1, MAX_EPOCHS),
        help="train this many epochs (replaces the config's train.time_budget)",
    )
    p.add_argument(
        "--time-budget",
        type=float_in(0, MAX_TIME_BUDGET),
        metavar="MINUTES",
        help="run as many of the epochs as fit this many minutes of training and evaluation here",
    )
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), help="images per step on each process")
    p.add_argument("--lr", type=float_in(0, 10), help="learning rate (default: base_lr x global batch / 1024)")
    p.add_argument("--output", help="run folder (checkpoints, logs); default: the config's, or the resumed run's")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the run already in --output (its checkpoints, logs and config are deleted when this run starts)",
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int_in(0, MAX_WORKERS), help="data loading processes per training process")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision: bfloat16 on CPU (where it has AVX-512 or AMX; elsewhere fp32 is faster and is used), "
        "float16 + GradScaler on CUDA",
    )
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="keep a model EMA")
    p.add_argument("--seed", type=int_in(0, MAX_SEED))
    if classification:
        _add_classification_options(p)
    count = int_in(1, MAX_IMAGES)
    p.add_argument("--limit-train", type=count, metavar="N", help="train on a fixed random subset of N images")
    p.add_argument("--limit-val", type=count, metavar="N", help="validate on a fixed random subset of N images")
    p.add_argument("--clip-grad", type=float_in(0, 1e6), metavar="NORM", help="clip the gradient norm")
    interval = int_in(1, MAX_INTERVAL)
    p.add_argument("--log-interval", type=interval, metavar="STEPS", help="steps between steps.jsonl records")
    p.add_argument(
        "--eval-interval", type=interval, metavar="EPOCHS", help="evaluate every N epochs and after the last"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config value, e.g. --set aug.mixup=0 --set sched.warmup_epochs=5 (repeatable)",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: on a terminal)"
    )
    return p


def _add_classification_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="distillation teacher: a timm model name (or a RapidNet variant)")
    p.add_argument(
        "--teacher-checkpoint",
        help="teacher weights: a file for --teacher, or any checkpoint rapidnet wrote (then --teacher may be left out)",
    )
    p.add_argument(
        "--distillation",
        choices=("none", "hard", "soft"),
        help="distillation loss (default with a teacher: hard, as in the paper)",
    )
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        default=None,
        help="skip unreadable image files (counted and reported) instead of stopping",
    )
    p.add_argument("--input-size", type=int_in(MIN_SIDE, MAX_SIDE), metavar="PX")
    p.add_argument("--pipeline", choices=("timm", "tensor"), help="input pipeline (tensor: in-memory data only)")


def _flag_settings(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """Config key -> (value, the flag that set it) for the flags that were given."""
    settings = {
        key: (getattr(args, dest), "--" + dest.replace("_", "-"))
        for dest, key in FLAG_KEYS.items()
        if getattr(args, dest, None) is not None
    }
    teacher = getattr(args, "teacher", None) or getattr(args, "teacher_checkpoint", None)
    if teacher and getattr(args, "distillation", None) is None:
        settings.setdefault(
            "distill.type", ("hard", "--teacher" if getattr(args, "teacher", None) else "--teacher-checkpoint")
        )
    if "train.epochs" in settings and "train.time_budget" not in settings:
        # the count asked for, not the one a config's budget would choose
        settings["train.time_budget"] = (None, "--epochs")
    return settings


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """Config assignments from the flags that were given."""
    return {key: value for key, (value, _) in _flag_settings(args).items()}


def run(args: argparse.Namespace) -> int:
    from rapidnet.tasks.classification import ClassificationTask

    return run_training(args, ClassificationTask)


def load_run_config(
    args: argparse.Namespace, extra: dict[str, Any] | None = None, extra_sources: dict[str, str] | None = None
) -> Any:
    """The run's config: ``--config`` (or, resuming without one, the checkpoint's), then flags and ``--set``.

    ``extra`` holds the values of a command's own flags, ``extra_sources`` those flags' names (for messages).
    """
    from rapidnet.config import load_config
    from rapidnet.engine.checkpoint import load_training_state

    settings = _flag_settings(args)  # each flag's value, and its name for a config error about that value
    values = {**(extra or {}), **{key: value for key, (value, _) in settings.items()}}
    sources = {**(extra_sources or {}), **{key: flag for key, (_, flag) in settings.items()}}
    base = None
    if args.resume:
        if args.config is None:
            base = load_training_state(args.resume)["config"]
        if "train.output" not in values:
            values["train.output"], sources["train.output"] = str(Path(args.resume).parent), "--resume"
    return load_config(args.config, args.overrides, base=base, values=values, sources=sources)


def run_training(args: argparse.Namespace, task_factory: Callable[[Any], Any], cfg: Any = None) -> int:
    """Train ``task_factory(cfg)`` with the engine (``cfg`` default: :func:`load_run_config`); the exit status."""
    from rapidnet.engine import Trainer
    from rapidnet.engine.trainer import RUN_FILES
    from rapidnet.utils import refuse_overwriting_input

    cfg = cfg if cfg is not None else load_run_config(args)
    # the run writes (and --force deletes) these files: none may be a checkpoint the run starts from
    run_files = [Path(cfg.train.output) / name for name in RUN_FILES if name != "config.yaml"]
    sources = (cfg.model.checkpoint, cfg.distill.teacher_checkpoint, cfg.task.get("backbone_checkpoint"))
    refuse_overwriting_input(run_files, *(s for s in sources if isinstance(s, str)))
    trainer = Trainer(task_factory(cfg), cfg, resume=args.resume, progress=args.progress, force=args.force)
    return trainer.fit().exit_code
