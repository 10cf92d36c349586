"""JSON-lines run logs: one record per epoch (``log.jsonl``) and every few steps (``steps.jsonl``).

JSONL because a killed run leaves every finished line readable, tools (``rapidnet plot``, pandas, jq) read it line
by line, and a resumed run can drop the lines it is about to redo so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidnet.errors import DataError
from rapidnet.utils import atomic_write, write_error

__all__ = ["JsonlLog", "read_jsonl"]


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # e.g. an interval [low, high]
        return [_clean(v) for v in value]
    return value


class JsonlLog:
    """Append-only JSONL file; a disabled log (non-zero ranks) ignores every call."""

    def __init__(self, path: str | os.PathLike[str], enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(_clean(record)) + "\n")
                f.flush()
        except OSError as e:  # a full disk: one line naming it (a torn last line is ignored when read)
            raise write_error(self.path, e) or e from None

    def keep_only(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite the file (atomically) without the records ``keep`` rejects, e.g. those after a resume point."""
        if not self.enabled or not self.path.exists():
            return
        records = [r for r in read_jsonl(self.path, missing_ok=True) if keep(r)]
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def read_jsonl(path: str | os.PathLike[str], missing_ok: bool = False) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (process killed mid-write) is ignored, other bad lines are errors."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return []
        raise DataError(f"log file {path} does not exist: pass a run folder written by `rapidnet train`")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(
            f"cannot read log {path}: it is not text (JSON lines): pass a log written by `rapidnet train`"
        ) from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"log file {path} line {number} is not JSON: was it edited by hand?") from None
        if isinstance(record, dict):
            records.append(record)
    return records
