"""The COCO instances format, checked record by record before pycocotools or a model sees a number of it.

pycocotools trusts its input: a box of three numbers, a category id written as a string, a NaN coordinate or an
empty annotation list travel on and surface later as a traceback, a full-width box or ``AP nan``. Here each record
is checked against the format (types, lengths, finiteness, ranges, references between the lists), and the first
problem is one line naming the file, the list, the record's index and id, the field and the fix.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Container, Mapping
from pathlib import Path
from typing import Any

from rapidnet.errors import DataError, clip

__all__ = ["MAX_ANNOTATION_BYTES", "MAX_IMAGE_SIDE", "read_coco_json", "validate_coco"]

#: the largest annotation file read: 100x COCO 2017 train's 448 MB would not fit the memory its objects take
MAX_ANNOTATION_BYTES = 4 << 30
#: the longest image side an annotation may claim (a 16-bit dimension, as PNG and JPEG tools assume)
MAX_IMAGE_SIDE = 65_535


def read_coco_json(path: Path) -> dict[str, Any]:
    """The JSON of an annotation file as a dict, or a one-line error (size, encoding, syntax, nesting)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"annotation file {path} cannot be read ({e.strerror}): check the path") from None
    if size > MAX_ANNOTATION_BYTES:
        raise DataError(
            f"annotation file {path} is {size / 2**30:.1f} GB, more than the {MAX_ANNOTATION_BYTES >> 30} GB this "
            "project reads: split it by image"
        )
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except RecursionError:
        raise DataError(f"annotation file {path} is nested too deeply to be COCO: re-export it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())[:100]
        raise DataError(f"annotation file {path} is not valid JSON ({detail}): re-export or re-download it") from None
    except OSError as e:
        raise DataError(f"annotation file {path} cannot be read ({e.strerror}): check the file") from None
    if not isinstance(data, dict):
        raise DataError(
            f"annotation file {path} holds a JSON {type(data).__name__}, not a COCO object: it needs 'images', "
            "'annotations' and 'categories' lists"
        )
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return clip(text)


class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str, fix: str) -> DataError:
        return DataError(f"{self.path}: {where}: {problem}: {fix}")

    def records(self, data: Mapping[str, Any], key: str, required: bool = True) -> list[Any]:
        records = data.get(key)
        if records is None:
            if not required:
                return []
            raise self.fail(f"no '{key}' list", "COCO instances need 'images', 'annotations' and 'categories'",
                            f"add the '{key}' list")  # fmt: skip
        if not isinstance(records, list):
            raise self.fail(f"'{key}'", f"is a {type(records).__name__}, not a list", f"make '{key}' a JSON list")
        if not records:
            raise self.fail(f"'{key}'", "is empty", f"add at least one {key[:-1]} (evaluation of nothing is AP nan)")
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise self.fail(f"{key}[{i}]", f"is a {type(record).__name__}, not an object", "fix the record")
        return records

    def ident(self, record: Mapping[str, Any], where: str, field: str = "id", minimum: int = 0) -> int:
        value = record.get(field)
        if not _is_int(value):
            kind = "missing" if value is None else f"{_show(value)} ({type(value).__name__})"
            raise self.fail(where, f"'{field}' is {kind}, not an integer", f"write '{field}' as a JSON integer")
        if value < minimum:
            raise self.fail(where, f"'{field}' is {value}, below {minimum}", f"use ids from {minimum}")
        return value

    def new_id(
        self, record: Mapping[str, Any], key: str, index: int, seen: Container[int], minimum: int = 0
    ) -> tuple[int, str]:
        """The record's ``id``, checked and not seen before in its list, and how messages name the record."""
        rid = self.ident(record, f"{key}[{index}]", minimum=minimum)
        where = f"{key}[{index}] (id {rid})"
        if rid in seen:
            raise self.fail(where, f"id {rid} appears twice", f"give each {key[:-1]} its own id")
        return rid, where

    def numbers(self, value: Any, where: str, field: str, count: int | None = None) -> list[float]:
        if not isinstance(value, list):
            raise self.fail(where, f"'{field}' is {_show(value)}, not a list of numbers", f"fix '{field}'")
        if count is not None and len(value) != count:
            raise self.fail(where, f"'{field}' has {len(value)} numbers, not {count}", f"fix '{field}'")
        for v in value:
            if not _is_number(v):
                raise self.fail(where, f"'{field}' holds {_show(v)}, not a finite number", f"fix '{field}'")
        return [float(v) for v in value]


def validate_coco(data: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Check a parsed COCO instances file; the first problem found is a one-line :class:`DataError`."""
    check = _Checker(Path(path))
    categories: set[int] = set()
    for i, cat in enumerate(check.records(data, "categories")):
        cid, where = check.new_id(cat, "categories", i, categories, minimum=1)
        if not isinstance(cat.get("name", ""), str):
            raise check.fail(where, f"'name' is {_show(cat.get('name'))}, not a string", "write the name as a string")
        categories.add(cid)
    images: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(check.records(data, "images")):
        iid, where = check.new_id(img, "images", i, images)
        name = img.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise check.fail(where, f"'file_name' is {_show(name)}", "give the image's file name in its folder")
        if os.path.isabs(name) or ".." in Path(name).parts or "\x00" in name:
            raise check.fail(where, f"'file_name' {_show(name)} leaves the image folder", "use a relative file name")
        sides = []
        for field in ("height", "width"):
            side = img.get(field)
            if not _is_int(side) or not 1 <= side <= MAX_IMAGE_SIDE:
                raise check.fail(
                    where, f"'{field}' is {_show(side)}", f"give the image's {field} in pixels (1..{MAX_IMAGE_SIDE})"
                )
            sides.append(side)
        images[iid] = (sides[0], sides[1])
    seen: set[int] = set()
    for i, ann in enumerate(check.records(data, "annotations")):
        aid, where = check.new_id(ann, "annotations", i, seen)
        seen.add(aid)
        image_id = check.ident(ann, where, "image_id")
        if image_id not in images:
            raise check.fail(where, f"image_id {image_id} is not in 'images'", "add the image or drop the annotation")
        cid = check.ident(ann, where, "category_id", minimum=1)
        if cid not in categories:
            known = f"{min(categories)}..{max(categories)}" if categories else "none"
            raise check.fail(
                where, f"category_id {cid} is not in 'categories' (ids {known})", "fix it or add the category"
            )
        w, h = check.numbers(ann.get("bbox"), where, "bbox", 4)[2:]
        if w < 0 or h < 0:
            raise check.fail(where, f"bbox has width {w:g} and height {h:g}", "boxes are [x, y, width, height], >= 0")
        if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
            raise check.fail(where, f"'area' is {_show(ann['area'])}", "give a finite area >= 0 or leave it out")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            raise check.fail(where, f"'iscrowd' is {_show(crowd)}", "use 0 or 1")
        _check_segmentation(check, ann, where, images[image_id])


def _check_segmentation(check: _Checker, ann: Mapping[str, Any], where: str, hw: tuple[int, int]) -> None:
    if "segmentation" not in ann:
        return
    seg = ann["segmentation"]
    if isinstance(seg, list):
        if not seg and ann.get("iscrowd", 0):
            raise check.fail(where, "a crowd region with an empty 'segmentation'", "give its RLE or drop it")
        for j, polygon in enumerate(seg):
            coords = check.numbers(polygon, where, f"segmentation[{j}]")
            if len(coords) < 6 or len(coords) % 2:
                raise check.fail(
                    where, f"segmentation[{j}] has {len(coords)} numbers", "a polygon is x, y pairs, at least three"
                )
        return
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not isinstance(size, list) or [int(v) if _is_int(v) else None for v in size] != list(hw):
            raise check.fail(
                where, f"RLE 'size' is {_show(size) if not isinstance(size, list) else size}", f"it must be {list(hw)}"
            )
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != hw[0] * hw[1]:
                raise check.fail(where, "RLE 'counts' are not run lengths covering the image", "re-encode the mask")
        elif not isinstance(counts, str):
            raise check.fail(where, f"RLE 'counts' is {_show(counts)}", "give a list of run lengths or a COCO string")
        return
    raise check.fail(where, f"'segmentation' is {_show(seg)}", "give a list of polygons or an RLE object")
