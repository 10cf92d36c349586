"""The docs are a reference, not a lab notebook: they state what holds, each figure table says how to reproduce it.

History (what changed, when, and the figures it superseded) belongs in CHANGELOG.md, which these checks skip.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
REFERENCE = [ROOT / "README.md", *DOCS]  # everything a user reads as "what holds"
FIGURE_DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md", ROOT / "docs" / "performance.md"]
MAX_LINES = 400  # results.md and performance.md: current figures by topic, not every measurement ever made

#: wording that narrates how the work went instead of stating what holds (matched case-insensitively, in prose only:
#: code spans and code blocks are skipped, so ``ort_session`` or ``--rounds 30`` never count)
NARRATION = {
    "who did it": r"\b(?:engineers?|helpers?|assistants?)\b|\bwe\b|(?<![\w.])I (?:ran|tried|measured|found)\b",
    "a working session": r"(?<!runtime )(?<!inference )\bsessions?\b",
    "a numbered or relative round": (
        r"\bround[ -]\d+\b|\b(?:\d+(?:st|nd|rd|th)|first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth)"
        r"\s+round\b|\b(?:this|that|next|previous|earlier|later|same)\s+round\b|\bround's\b"
    ),
    "a section named by its order": r"\b(?:\w+th|first|second|third)\s+section\b",
    "a day or hour of the work": (
        r"\byesterday\b|\btoday\b|\btomorrow\b|\bthis time\b|\b(?:next|previous|same|that|following)\s+day\b"
        r"|\bday's\b|\b(?:this|that|the same|next)\s+hour\b|\bhours?\s+(?:later|earlier|apart)\b"
    ),
    "the order things were done in": (
        r"\bre-?ran\b|\bat first\b|\btried first\b|\bfirst (?:try|attempt|start)\b|\bthen we\b|\bnext step\b"
        r"|\bso far\b|\b(?:closing|issue|earlier|previous) note\b"
    ),
}
_NARRATION = {why: re.compile(pattern, re.IGNORECASE) for why, pattern in NARRATION.items()}

COMMAND_PREFIXES = ("rapidnet ", "python ", "bash ", "make ")
_ENV = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)+")  # OMP_NUM_THREADS=1 rapidnet train ... counts as a command
_SPAN = re.compile(r"`([^`\n]+)`")
_DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
_MACHINE = re.compile(r"\b(?:EPYC|Xeon)\b")
_FIGURE = re.compile(r"\d+\.\d+|\d+%")


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the prose: fenced code blocks dropped, inline code spans blanked."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, _SPAN.sub("``", line)))
    return lines


def _sections(path: Path) -> list[tuple[str, int, list[str]]]:
    """(heading, line number, lines) per section; a heading of any level starts one (``#`` inside code does not)."""
    sections: list[tuple[str, int, list[str]]] = [("(top)", 1, [])]
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            sections.append((line.lstrip("# ").strip(), number, []))
        sections[-1][2].append(line)
    return sections


def _tables(lines: list[str]) -> list[list[str]]:
    """The markdown tables of a section: each a list of its rows (header, separator, body)."""
    tables, current = [], []
    for line in [*lines, ""]:
        if line.lstrip().startswith("|"):
            current.append(line.strip())
        else:
            if len(current) >= 3 and re.match(r"^\|[\s:|-]+\|$", current[1]):
                tables.append(current)
            current = []
    return tables


def _commands(lines: list[str]) -> list[str]:
    """The code spans of a section that are commands a user can run (inline spans and lines of code blocks)."""
    found, fenced = [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        candidates = [line.strip()] if fenced else _SPAN.findall(line)
        found += [c for c in candidates if _ENV.sub("", c).startswith(COMMAND_PREFIXES)]
    return found


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_state_what_holds_not_how_the_work_went(path):
    found = [
        f"{path.relative_to(ROOT)}:{number}: {why} ({match.group(0)!r}): {line.strip()[:100]}"
        for number, line in _prose_lines(path)
        for why, pattern in _NARRATION.items()
        for match in [pattern.search(line)]
        if match
    ]
    assert not found, "narration belongs in CHANGELOG.md; state what holds instead:\n" + "\n".join(found)


@pytest.mark.parametrize("name", ["results.md", "performance.md"])
def test_figure_docs_stay_short(name):
    lines = len((ROOT / "docs" / name).read_text().splitlines())
    assert lines < MAX_LINES, (
        f"docs/{name}: {lines} lines; keep the current figures, move superseded ones to CHANGELOG.md"
    )


@pytest.mark.parametrize("path", FIGURE_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_figure_table_says_how_to_reproduce_it(path):
    """A section that holds a table also holds a command (``rapidnet ...``, ``python ...``, ``bash ...``, ``make ...``);
    in results.md and performance.md a table of figures also names its machine and the date it was measured."""
    missing = []
    for heading, number, lines in _sections(path):
        tables = _tables(lines)
        if not tables:
            continue
        where = f"{path.relative_to(ROOT)}:{number} ({heading})"
        if not _commands(lines):
            missing.append(f"{where}: a table but no command that reproduces it")
        if path.name == "README.md" or not any(_FIGURE.search(" ".join(t[2:])) for t in tables):
            continue
        text = "\n".join(lines)
        if not _DATE.search(text):
            missing.append(f"{where}: figures without the date they were measured (YYYY-MM-DD)")
        if not _MACHINE.search(text):
            missing.append(f"{where}: figures without the machine they were measured on")
    assert not missing, "\n".join(missing)


def test_the_readme_starts_with_the_two_set_up_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:8]
    assert any(line.startswith("make demo ") for line in head), head
    assert any(line.startswith("make test ") for line in head), head


def test_the_checks_catch_narration_and_tables_without_commands(tmp_path):
    """The scanners themselves: narration in prose is found, the same words in code are not; a table with no
    command nearby is found."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# T\n\nIn round 8 we re-ran it; the next day it held.\n\n`ort_session(path)` and `--rounds 30` are code.\n"
        "\n## Figures\n\n| a | b |\n|---|---|\n| 1.5 | 2 |\n\n## Reproduced\n\n| a |\n|---|\n| 3.5 |\n\n"
        "`OMP_NUM_THREADS=1 rapidnet train --config c.yaml`\n"
    )
    hits = {why for _, line in _prose_lines(doc) for why, pattern in _NARRATION.items() if pattern.search(line)}
    assert hits == {"who did it", "a numbered or relative round", "a day or hour of the work",
                    "the order things were done in"}  # fmt: skip
    without = [heading for heading, _, lines in _sections(doc) if _tables(lines) and not _commands(lines)]
    assert without == ["Figures"]


_TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)(?:\[[^\]]*\])?`")


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_a_doc_cites_exists(path):
    """A promise in the docs is only as good as its test: every ``tests/file.py::test_name`` cited must be defined."""
    missing = []
    for file, name in _TEST_ID.findall(path.read_text()):
        source = ROOT / file
        if not source.is_file() or not re.search(rf"^(?:async )?def {name}\(", source.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"{path.relative_to(ROOT)} cites tests that do not exist: {missing}"


def test_the_config_reference_is_current():
    """docs/configs.md is generated from the fields' declared constraints; a changed field must regenerate it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = ROOT / "docs" / "configs.md"
    assert page.read_text() == module.render(), "docs/configs.md is out of date: run python scripts/config_reference.py"
    assert "`train.epochs` | int | `300` | 1..100000 |" in page.read_text()
