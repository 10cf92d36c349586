"""Semantic segmentation on RapidNet: ``rapidnet.segmentation.semantic_fpn`` (see ``rapidnet.tasks``)."""

from rapidnet.tasks.segmentation import semantic_fpn

__all__ = ["semantic_fpn"]
