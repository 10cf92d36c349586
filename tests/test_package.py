"""The package's shape: the layering that docs/architecture.md draws, and the entry points a user types first."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rapidnet

SRC = Path(rapidnet.__file__).resolve().parent

#: what each top-level part may import from the rest of the package (lower layers never import upper ones)
ALLOWED = {
    "errors": set(),
    "utils": {"errors"},
    "config": {"errors", "utils"},
    "data": {"errors", "utils"},
    "metrics": {"errors", "utils"},
    "visualize": {"errors", "utils"},
    "models": {"errors", "utils"},
    "engine": {"errors", "utils", "config"},
    "deploy": {"errors", "utils", "data", "models"},
    "tasks": {"errors", "utils", "config", "data", "models", "engine", "metrics"},
    "analysis": {"errors", "utils", "data", "models"},
    "__init__": {"errors", "utils", "models"},
}


def _rapidnet_imports(path: Path) -> set[str]:
    """The top-level parts of rapidnet that a file imports (``rapidnet.models.x`` -> ``models``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "rapidnet":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_lower_layers_never_import_upper_ones(path):
    part = _part(path)
    if part not in ALLOWED:
        assert part in ("cli", "__main__"), f"{path}: a new top-level part: add it to ALLOWED and architecture.md"
        return
    wrong = _rapidnet_imports(path) - ALLOWED[part] - {part}
    assert not wrong, f"{path.relative_to(SRC)} ({part}) imports {sorted(wrong)}"


def test_the_network_file_holds_no_cpu_kernel_selection():
    """models/ is the paper and timm's API; eager-CPU kernel tricks live in rapidnet.deploy.cpu."""
    for path in (SRC / "models").glob("*.py"):
        text = path.read_text()
        assert "mkldnn" not in text and "_python_dispatch" not in text, path.name


def test_version_and_python_m():
    """``python -m rapidnet`` is the ``rapidnet`` command; ``--version`` names the package version."""
    proc = subprocess.run([sys.executable, "-m", "rapidnet", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"rapidnet {rapidnet.__version__}"
    proc = subprocess.run([sys.executable, "-m", "rapidnet", "info", "--json", "rapidnet_ti"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"rapidnet_ti"' in proc.stdout


def test_configs_carry_no_machine_logs():
    """Results and timings belong in docs/, not in the YAML headers (they go stale with every machine)."""
    for path in (SRC.parents[1] / "configs").glob("*.yaml"):
        # every comment, on a line of its own or after a value (no config value holds a "#")
        comments = "\n".join(line.partition("#")[2] for line in path.read_text().splitlines())
        for stale in ("minutes each", "Intel machine", "AMD machine", "img/s", "images/s", "x faster"):
            assert stale not in comments, f"{path.name} mentions {stale!r}: move it to docs/results.md"


_DOTTED = re.compile(r"\brapidnet(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_FILE = re.compile(r"\b((?:docs|configs|benchmarks|tests|scripts|src/rapidnet)/[\w./-]+\.(?:md|yaml|py|sh))\b")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_docs_and_docstrings_cite_what_exists():
    """Every ``rapidnet.x.y`` and every repository path named in the docs, the README and the sources exists."""
    root = SRC.parents[1]
    texts = [*SRC.rglob("*.py"), *(root / "docs").glob("*.md"), root / "README.md", *(root / "configs").glob("*")]
    missing = set()
    for path in texts:
        text = path.read_text()
        for ref in _DOTTED.findall(text):
            if not ref.endswith((".py", ".md", ".yaml")) and not _resolves(ref):
                missing.add(f"{path.name}: {ref}")
        missing |= {f"{path.name}: {f}" for f in _FILE.findall(text) if not (root / f).exists()}
    assert not missing, sorted(missing)
