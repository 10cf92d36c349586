"""Detection and instance segmentation on RapidNet: ``rapidnet.detection.mask_rcnn`` (see ``rapidnet.tasks``)."""

from rapidnet.tasks.detection import mask_rcnn

__all__ = ["mask_rcnn"]
