"""Write docs/configs.md: every config key, its type, default and the range it must be in, read off the dataclasses.

    .venv/bin/python scripts/config_reference.py            # rewrite docs/configs.md
    .venv/bin/python scripts/config_reference.py --check    # exit 1 when docs/configs.md is out of date

The constraints are declared on the fields (``rapidnet.config.setting``), so this page and the one-line errors
cannot disagree; ``tests/test_docs.py`` keeps the page current.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from rapidnet.config import Config, field_requirement, type_name
from rapidnet.tasks.detection import DetectionOptions
from rapidnet.tasks.segmentation import SegmentationOptions

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configs.md"

HEADER = """# Config keys

Generated from `src/rapidnet/config.py` and the dense tasks' options by `python scripts/config_reference.py`; do not
edit by hand. A config file (`configs/*.yaml`) sets any of these keys; `base:` names files it inherits from, and
`rapidnet train --set KEY=VALUE` (or a flag such as `--epochs`) overrides one. A key not listed, a value of the wrong
type or outside the range below is refused in one line naming the key, the range and where the value came from (the
file, the `--set` override or the flag). Checks across keys: a `distill.type` other than `none` needs a teacher and
`model.distillation` true or null; `sched.warmup_epochs` is whole where `sched.step_on_epochs` is true;
`sched.decay_milestones` lie within `train.epochs`; `aug.zoom` is `[min, max]` with min <= max; `model.kwargs` may
not repeat a `model.*` key.
"""


def _default(f: dataclasses.Field[typing.Any]) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("'", "") if value != "" else '""'


def section(cls: type, prefix: str) -> list[str]:
    """One markdown table: key, type, default, what it must be."""
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | must be |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        need = field_requirement(cls, f.name) or ""
        rows.append(f"| `{prefix}.{f.name}` | {type_name(hints[f.name])} | `{_default(f)}` | {need} |")
    return rows


def render() -> str:
    hints = typing.get_type_hints(Config)
    lines = [HEADER]
    for f in dataclasses.fields(Config):
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            lines += [f"## `{f.name}`", "", (cls.__doc__ or "").strip(), "", *section(cls, f.name), ""]
    for title, cls in (("detection (`rapidnet det train`)", DetectionOptions),
                       ("segmentation (`rapidnet seg train`)", SegmentationOptions)):  # fmt: skip
        lines += [f"## `task:` of {title}", "", (cls.__doc__ or "").strip(), "", *section(cls, "task"), ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only say whether docs/configs.md is current")
    args = p.parse_args()
    text = render()
    if args.check:
        current = PAGE.read_text() if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
