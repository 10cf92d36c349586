"""The engine's tasks, one file each: classification, detection (Mask R-CNN), segmentation (Semantic FPN).

``TASKS`` maps a config's ``task.name`` to its class; ``rapidnet train``, ``det train`` and ``seg train`` pick from it,
and ``TRAIN_COMMANDS`` names the command of each (a task refuses a config for another one, naming its command).
"""

from rapidnet.tasks._commands import TRAIN_COMMANDS
from rapidnet.tasks.classification import ClassificationTask
from rapidnet.tasks.detection import DetectionTask
from rapidnet.tasks.segmentation import SegmentationTask

TASKS = {"classification": ClassificationTask, "detection": DetectionTask, "segmentation": SegmentationTask}

__all__ = ["TASKS", "TRAIN_COMMANDS", "ClassificationTask", "DetectionTask", "SegmentationTask"]
