"""API-surface guard and the package's import-direction rules (design.md, section 1)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import adaptkit

PKG_DIR = Path(adaptkit.__file__).resolve().parent

#: Update deliberately when the public surface changes.
EXPECTED_ALL = [
    "AdaptationWarning",
    "BNAdapt",
    "ClusT3",
    "ClusT3Head",
    "CoTTA",
    "EATA",
    "ETA",
    "LAME",
    "MEMO",
    "NCTTT",
    "NCTTTHead",
    "OCL",
    "RoTTA",
    "RotationHead",
    "SAR",
    "SHOTIM",
    "ShiftScore",
    "T3A",
    "TTAMethod",
    "TTT",
    "TTTPPHead",
    "TTTPlusPlus",
    "Tent",
    "__version__",
    "adapt",
    "get_method",
    "list_layers",
    "list_methods",
    "register_method",
    "shift_score",
]


def test_all_is_sorted_and_expected() -> None:
    assert adaptkit.__all__ == sorted(adaptkit.__all__)
    assert sorted(adaptkit.__all__) == sorted(EXPECTED_ALL)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_public_name_importable(name: str) -> None:
    assert hasattr(adaptkit, name)
    exec(f"from adaptkit import {name}", {})


@pytest.mark.parametrize(
    "pkg", ["adaptkit.core", "adaptkit.functional", "adaptkit.methods", "adaptkit.heads", "adaptkit.train"]
)
def test_subpackage_all_sorted_and_importable(pkg: str) -> None:
    mod = importlib.import_module(pkg)
    names = list(mod.__all__)
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for n in names:
        assert getattr(mod, n) is not None, f"{pkg}.{n}"


def test_version_string() -> None:
    assert isinstance(adaptkit.__version__, str) and adaptkit.__version__.count(".") >= 1


def test_py_typed_marker_present() -> None:
    assert (PKG_DIR / "py.typed").is_file()


def test_import_is_light() -> None:
    """``import adaptkit`` pulls in neither the benchmark code nor the lazily imported optional packages."""
    code = (
        "import sys, adaptkit\n"
        "bad = [m for m in sys.modules if m == 'adaptkit.bench' or m.startswith('adaptkit.bench.')"
        " or m.split('.')[0] in ('matplotlib', 'timm')]\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert res.stdout.strip() == "", f"import adaptkit imported: {res.stdout.strip()}"


# ---------------------------------------------------------------- import direction


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every absolute module name imported anywhere in ``source`` (including function-level imports)."""
    found: set[str] = set()
    pkg_parts = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # ``from adaptkit import bench`` imports the submodule
            found.update(f"{target}.{a.name}" for a in node.names if a.name != "*")
    return found


def _area(name: str) -> str | None:
    """The adaptkit sub-area of a module name (``core``, ``functional``, ..., or a top-level module name)."""
    parts = name.split(".")
    if parts[0] != "adaptkit":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


#: area -> areas it must not import (design.md dependency direction).
FORBIDDEN: dict[str, set[str]] = {
    "core": {"methods", "registry", "bench", "heads", "train", "data"},
    "heads": {"methods", "bench", "registry"},
    "train": {"methods", "bench", "registry"},
    "__init__": {"bench"},
}
#: areas that are leaves: they import nothing else from adaptkit (the version constant excepted).
LEAVES = {"functional", "data", "metrics"}
#: modules any area may import: constants only.
ALWAYS_ALLOWED = {"_version"}


def edge_violations(module: str, imports: set[str]) -> list[str]:
    """Forbidden ``module -> import`` edges."""
    src = _area(module)
    bad = []
    for imp in sorted(imports):
        dst = _area(imp)
        if dst is None or src is None or dst in ALWAYS_ALLOWED:
            continue
        if dst == "bench" and src != "bench":
            bad.append(f"{module} -> {imp} (nothing imports adaptkit.bench)")
        elif src in LEAVES and dst != src and imp != "adaptkit":
            bad.append(f"{module} -> {imp} ({src} is a leaf: torch only)")
        elif src in LEAVES and imp == "adaptkit":
            bad.append(f"{module} -> adaptkit ({src} is a leaf: torch only)")
        elif dst in FORBIDDEN.get(src, set()):
            bad.append(f"{module} -> {imp} ({src} must not import {dst})")
    return bad


def _all_modules() -> list[tuple[str, Path]]:
    return [(_module_name(p), p) for p in sorted(PKG_DIR.rglob("*.py"))]


def test_module_discovery_sane() -> None:
    names = {n for n, _ in _all_modules()}
    assert {"adaptkit", "adaptkit.core.base", "adaptkit.functional.moments", "adaptkit.methods.tent"} <= names


def test_import_direction() -> None:
    violations = []
    for name, path in _all_modules():
        imports = imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
        violations += edge_violations(name, imports)
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("module", "is_pkg", "source", "expect_bad"),
    [
        ("adaptkit.functional.entropy", False, "from adaptkit.core import base", True),
        ("adaptkit.functional.entropy", False, "from ..core import base", True),
        ("adaptkit.functional.entropy", False, "from .moments import Moments", False),
        ("adaptkit.functional.entropy", False, "import torch\nfrom adaptkit.functional import moments", False),
        ("adaptkit.functional.entropy", False, "def f():\n    import adaptkit.registry", True),
        ("adaptkit.core.base", False, "from adaptkit.methods import tent", True),
        ("adaptkit.core.base", False, "from adaptkit import registry", True),
        ("adaptkit.core.base", False, "from ..data import corruptions", True),
        ("adaptkit.core.base", False, "from adaptkit.functional import moments", False),
        ("adaptkit.core", True, "from .layers import list_layers", False),
        ("adaptkit.core", True, "from ..heads import AuxHead", True),
        ("adaptkit.methods.tent", False, "from adaptkit.bench import runner", True),
        ("adaptkit.methods.tent", False, "from adaptkit.core.base import TTAMethod", False),
        ("adaptkit", True, "from adaptkit import bench", True),
        ("adaptkit", True, "from . import bench", True),
        ("adaptkit", True, "from adaptkit.methods import Tent", False),
        ("adaptkit.bench.cli", False, "from adaptkit.bench.runner import run\nimport adaptkit", False),
    ],
)
def test_import_checker_detects(module: str, is_pkg: bool, source: str, expect_bad: bool) -> None:
    assert bool(edge_violations(module, imported_modules(source, module, is_pkg))) is expect_bad


def test_warnings_share_one_category_users_can_filter() -> None:
    """api.md: every adaptkit warning is an ``adaptkit.AdaptationWarning`` (a UserWarning subclass)."""
    import warnings

    import torch
    import torch.nn as nn

    assert issubclass(adaptkit.AdaptationWarning, UserWarning)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.rand(2, 3, 8, 8))
    model.eval()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with adaptkit.BNAdapt(model, N=0) as bn:
            bn(torch.rand(2, 3, 8, 8))  # N=0 with 2 samples: the small-batch warning
        adaptkit.EATA(model).restore()  # no source data: runs as ETA, said clearly
    cats = {w.category for w in rec}
    assert cats == {adaptkit.AdaptationWarning}, [str(w.message) for w in rec]
    assert len(rec) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=adaptkit.AdaptationWarning)
        with adaptkit.BNAdapt(model, N=0) as bn:
            bn(torch.rand(2, 3, 8, 8))
