"""The benchmark library stands without the command line, and its figures without its report module."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import adaptkit
import adaptkit.bench
import adaptkit.cli
import adaptkit.models
from adaptkit.bench import report, tasks

BENCH = Path(adaptkit.bench.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (top level or inside functions), relative ones resolved;
    ``from package import name`` also yields ``package.name``."""
    package = ["adaptkit", "bench"]  # every file scanned here lives in adaptkit/bench/
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def test_import_scanner_sees_every_form(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from .report import x\nfrom . import report\ndef f():\n    import adaptkit.cli\n"
        "from adaptkit.bench.report import y\n"
    )
    found = _imports(src)
    assert {"adaptkit.bench.report", "adaptkit.cli"} <= found


@pytest.mark.parametrize("path", sorted(p for p in BENCH.glob("*.py") if p.name != "cli.py"), ids=lambda p: p.name)
def test_bench_library_never_imports_the_cli(path: Path) -> None:
    """Only the ``adaptkit bench`` plug-in (``bench/cli.py``) may import ``adaptkit.cli``."""
    bad = {m for m in _imports(path) if m == "adaptkit.cli" or m.startswith("adaptkit.cli.")}
    assert not bad, f"{path.name} imports {bad}"


def test_plots_does_not_import_report() -> None:
    """``report`` calls ``plots``; ``plots`` takes what both need from ``tasks``, so there is no cycle."""
    found = _imports(BENCH / "plots.py")
    assert not {m for m in found if m == "adaptkit.bench.report" or m.startswith("adaptkit.bench.report.")}
    assert "adaptkit.bench.tasks" in found and "adaptkit.bench.tasks" in _imports(BENCH / "report.py")
    assert report.score_key is tasks.score_key  # still importable from the report module


def test_bench_imports_and_builds_models_with_the_cli_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bench module imports afresh, and a model name resolves, while ``import adaptkit.cli`` fails.

    In this process (a subprocess would spend seconds importing torch): the bench modules and the low modules
    they use are dropped from ``sys.modules`` and re-imported; ``monkeypatch`` puts the originals back."""
    original = sys.modules["adaptkit.bench"]
    fresh = ["adaptkit.models", "adaptkit._progress", "adaptkit.bench"]
    for name in [n for n in sys.modules if n in fresh or n.startswith("adaptkit.bench.")]:
        monkeypatch.delitem(sys.modules, name)
    for attr in ("models", "_progress", "bench"):
        monkeypatch.setattr(adaptkit, attr, getattr(adaptkit, attr, None), raising=False)
    monkeypatch.delattr(adaptkit, "cli", raising=False)  # else ``from adaptkit import cli`` finds the attribute
    monkeypatch.setitem(sys.modules, "adaptkit.cli", None)  # any import of the command line now raises
    with pytest.raises(ImportError):
        from adaptkit import cli  # noqa: F401
    bench = importlib.import_module("adaptkit.bench")
    assert bench is not original
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name != "cli":
            importlib.import_module(f"adaptkit.bench.{info.name}")
    load_model = importlib.import_module("adaptkit.bench.models").load_model
    net = load_model("resnet18", num_classes=3)
    assert net.fc.out_features == 3 and not net.training
    with pytest.raises(ValueError, match="Did you mean 'resnet18'") as err:
        load_model("resnt18")
    assert type(err.value).__name__ == "ModelLookupError"


def test_cli_build_model_is_the_library_one() -> None:
    assert adaptkit.cli.build_model is adaptkit.models.build_model
    with pytest.raises(adaptkit.models.ModelLookupError, match="Did you mean 'resnet18'"):
        adaptkit.models.build_model("resnt18", "torchvision")
