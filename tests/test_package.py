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
    "constants": set(),
    "runtimes": set(),
    "scratch": set(),  # the command's temporary folder: standard library only, set up before torch loads
    "utils": {"errors", "runtimes", "scratch"},
    "config": {"errors", "utils", "constants"},
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
#: plain values and names without imports (what the command line's parsers read): any other part may import them
LEAVES = {"constants", "runtimes"}


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
    wrong = _rapidnet_imports(path) - ALLOWED[part] - {part} - (set() if part in LEAVES or part == "errors" else LEAVES)
    assert not wrong, f"{path.relative_to(SRC)} ({part}) imports {sorted(wrong)}"


def test_the_network_file_holds_no_cpu_kernel_selection():
    """models/ is the paper and timm's API; backend speed tricks live with their backend in rapidnet.deploy."""
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


def _fresh_python(code: str) -> str:
    """stdout of ``code`` in a new interpreter (this one has torch, timm and the models imported already)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_rapidnet_then_timm_finds_the_models():
    """``import rapidnet`` loads no torch (the command's start-up), yet timm finds the variants once it is imported,
    and the documented attributes are there."""
    out = _fresh_python(
        "import sys, rapidnet\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'import rapidnet loaded torch'\n"
        "assert isinstance(rapidnet.__version__, str)\n"
        "import timm\n"
        "model = timm.create_model('rapidnet_ti', num_classes=3)\n"
        "from rapidnet import RapidNet\n"
        "assert isinstance(model, RapidNet) and rapidnet.RapidNet is RapidNet\n"
        "assert callable(rapidnet.create_model) and callable(rapidnet.load) and 'rapidnet_b' in rapidnet.VARIANTS\n"
        "print(timm.__loader__ is timm.__spec__.loader, type(timm.__loader__).__name__)\n"
    )
    assert out.split() == ["True", "SourceFileLoader"]  # timm keeps its own loader


def test_import_timm_then_rapidnet_registers_at_once():
    out = _fresh_python("import timm, rapidnet\nprint(' '.join(timm.list_models('rapidnet*')))")
    assert out.split() == ["rapidnet_b", "rapidnet_m", "rapidnet_s", "rapidnet_ti"]


def test_from_rapidnet_import_without_timm_first():
    out = _fresh_python(
        "from rapidnet import RapidNet, create_model\n"
        "import timm\n"
        "print(type(create_model('rapidnet_ti')).__name__, len(timm.list_models('rapidnet*')))"
    )
    assert out.split() == ["RapidNet", "4"]


def test_light_names_agree_with_what_they_name():
    """``rapidnet.constants`` and ``rapidnet.runtimes`` hold what the parsers show; the modules that act on them use
    the same objects (and the mosaic has one look per style name)."""
    from rapidnet import constants, runtimes
    from rapidnet.data import mosaic
    from rapidnet.deploy import registry
    from rapidnet.models import metadata

    assert tuple(mosaic._LOOKS) == constants.MOSAIC_STYLES
    assert constants.DEFAULT_MOSAIC_STYLE in constants.MOSAIC_STYLES
    assert metadata.MAX_SIDE is constants.MAX_SIDE and metadata.INTERPOLATIONS is constants.INTERPOLATIONS
    assert registry._RUNTIMES is runtimes.RUNTIMES and registry.unalias is runtimes.unalias


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


def test_no_module_is_shadowed_by_what_its_package_exports():
    """``import rapidnet.models.detection as m`` must give the module: a package that re-exports a function under its
    own module's name (``mask_rcnn`` from ``mask_rcnn.py``) hides the module behind the function."""
    import pkgutil
    import types

    shadowed = []
    for info in pkgutil.walk_packages(rapidnet.__path__, "rapidnet."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
        parent, _, child = info.name.rpartition(".")
        if not isinstance(getattr(importlib.import_module(parent), child, None), types.ModuleType):
            shadowed.append(info.name)
    assert not shadowed, f"modules hidden behind a name their package exports: {shadowed}"
