"""The generic training engine: one loop for classification, detection and segmentation.

A task (``rapidnet.engine.Task`` subclass) supplies data, model, loss, metrics and export; ``Trainer(task,
cfg).fit()`` supplies processes (torchrun/DDP), AMP, channels_last, torch.compile, optimizer and schedule,
checkpoints with exact resume, signal handling, NaN guards, a lock on the run folder, JSONL logs of every named loss
and progress bars; callbacks (``rapidnet.engine.callbacks``, on the hooks of ``rapidnet.engine.hooks``) add EMA,
BN-statistics averaging, the best checkpoint and its exported weights, the final report on a split kept apart from
selection, TensorBoard event files, and whatever a user passes in ``Trainer(..., callbacks=[...])``.
"""

from rapidnet.engine.callbacks import (
    BatchNormAveraging,
    BestCheckpoint,
    ExportBest,
    FinalReport,
    ModelEma,
    TensorBoard,
    default_callbacks,
)
from rapidnet.engine.checkpoint import load_training_state, save_training_state
from rapidnet.engine.distributed import DistInfo, all_reduce_sum, init_distributed, reduce_sums
from rapidnet.engine.hooks import Callback, FitResult, TrainerAPI
from rapidnet.engine.run_folder import BEST, BEST_WEIGHTS, LAST
from rapidnet.engine.run_lock import RunLock
from rapidnet.engine.runlog import JsonlLog, read_jsonl
from rapidnet.engine.seeding import SeededDataset, SeededSampler, mix_seed, seed_everything
from rapidnet.engine.task import RunContext, StepOutput, Task
from rapidnet.engine.trainer import NonFiniteLossError, Trainer

__all__ = [
    "BEST",
    "BEST_WEIGHTS",
    "LAST",
    "BatchNormAveraging",
    "BestCheckpoint",
    "Callback",
    "DistInfo",
    "ExportBest",
    "FinalReport",
    "FitResult",
    "JsonlLog",
    "ModelEma",
    "NonFiniteLossError",
    "RunContext",
    "RunLock",
    "SeededDataset",
    "SeededSampler",
    "StepOutput",
    "Task",
    "TensorBoard",
    "Trainer",
    "TrainerAPI",
    "all_reduce_sum",
    "default_callbacks",
    "init_distributed",
    "load_training_state",
    "mix_seed",
    "read_jsonl",
    "reduce_sums",
    "save_training_state",
    "seed_everything",
]
