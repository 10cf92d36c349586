"""The generic training engine: one loop for classification now and for detection/segmentation later.

A task (``rapidnet.engine.Task`` subclass) supplies data, model, loss, metrics and export; ``Trainer(task,
cfg).fit()`` supplies processes (torchrun/DDP), AMP, channels_last, torch.compile, EMA, optimizer and schedule,
checkpoints with exact resume, signal handling, NaN guards, JSONL logs and progress bars.
"""

from rapidnet.engine.checkpoint import load_training_state, save_training_state
from rapidnet.engine.distributed import DistInfo, all_reduce_sum, init_distributed, reduce_sums
from rapidnet.engine.runlog import JsonlLog, read_jsonl
from rapidnet.engine.seeding import SeededDataset, SeededSampler, mix_seed, seed_everything
from rapidnet.engine.task import RunContext, StepOutput, Task
from rapidnet.engine.trainer import BEST, BEST_WEIGHTS, LAST, FitResult, NonFiniteLossError, Trainer

__all__ = [
    "BEST",
    "BEST_WEIGHTS",
    "LAST",
    "DistInfo",
    "FitResult",
    "JsonlLog",
    "NonFiniteLossError",
    "RunContext",
    "SeededDataset",
    "SeededSampler",
    "StepOutput",
    "Task",
    "Trainer",
    "all_reduce_sum",
    "init_distributed",
    "load_training_state",
    "mix_seed",
    "read_jsonl",
    "reduce_sums",
    "save_training_state",
    "seed_everything",
]
