"""Run the scripts in ``examples/`` as subprocesses (quick mode) and check their key output lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, quick: bool = True, timeout: float = 300) -> str:
    env = dict(os.environ)
    if quick:
        env["ADAPTKIT_EXAMPLES_QUICK"] = "1"
    else:
        env.pop("ADAPTKIT_EXAMPLES_QUICK", None)
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert res.returncode == 0, f"{name} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_ncttt_quickstart() -> None:
    out = run_example("ncttt_quickstart.py")
    assert "head trained on ['layer1']" in out
    assert "reloaded head: mode=pixel" in out
    assert "NC-TTT" in out and "model unchanged after the with block: True" in out


def test_clust3_two_layers() -> None:
    out = run_example("clust3_two_layers.py")
    assert "trained 10 projectors on ['layer1', 'layer2']" in out
    assert "layer3 forwards during adaptation: 0" in out
    assert "model restored bitwise after the with blocks: True" in out


def test_ttt_rotation() -> None:
    out = run_example("ttt_rotation.py")
    assert "model restored: True" in out
    assert "head bound to ['layer2']" in out
    assert "TTT          class accuracy on the shifted data" in out


def test_tttpp_online() -> None:
    out = run_example("tttpp_online.py")
    assert "model restored: True" in out
    assert "adaptation state reproduces the last predictions: True" in out
    assert "after reset(): queue 0 rows, weights back to the source: True" in out


def test_ocl_deeplabv3() -> None:
    out = run_example("ocl_deeplabv3.py")
    assert "on fog-5: source" in out and "OCL" in out
    assert "model unchanged after the with blocks: True" in out


def test_wrap_torchvision() -> None:
    out = run_example("wrap_torchvision.py")
    assert out.count("model unchanged after the with block: True") == 2
    assert "source outputs identical after both wrappers: True" in out
    assert "BNAdapt(N=16): 20 BN layers" in out


def test_wrap_timm() -> None:
    pytest.importorskip("timm")
    out = run_example("wrap_timm.py")
    assert "restored, outputs identical to the source: True" in out
    assert "BNAdapt refuses" in out
    assert "LayerNorm" in out
    assert "every parameter requires grad again: True" in out


def test_wrap_custom_cnn() -> None:
    out = run_example("wrap_custom_cnn.py")
    assert "BNAdapt include=r'block1\\..*': ['block1.1']" in out
    assert "['block1.1', 'block2.1']" in out
    assert "reloaded state reproduces the adapted outputs: True" in out
    assert "Did you mean 'block1.1'?" in out
    assert "hooks left: 0" in out


def _table(out: str) -> dict[str, tuple[float, float]]:
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(None, 2)
        if len(parts) == 3 and line.startswith(("source", "BNAdapt", "Tent")):
            rows[parts[0].split()[0]] = (float(parts[1]), float(parts[2]))
    return rows


#: one runnable example per method of the field's set (issue 13); each says whether the model came back unchanged
METHOD_EXAMPLES = [
    "lame_example.py", "t3a_example.py", "eata_example.py", "shot_im_example.py", "sar_example.py",
    "cotta_example.py", "memo_example.py", "rotta_example.py",
]  # fmt: skip


@pytest.mark.parametrize("name", METHOD_EXAMPLES)
def test_method_examples(name: str) -> None:
    out = run_example(name)
    assert "model unchanged after the with block: True" in out, out


def test_quickstart_quick() -> None:
    """Smoke test in quick mode (~60 training steps): the table is complete and the model is restored."""
    out = run_example("quickstart.py")
    assert "model restored: True" in out
    rows = _table(out)
    assert set(rows) == {"source", "BNAdapt(N=0)", "BNAdapt(N=16)", "Tent(lr=1e-3)"}


@pytest.mark.slow
def test_quickstart_full(request: pytest.FixtureRequest) -> None:
    """The README's main job: a meaningful before/after (not a timed or accuracy-tuned test)."""
    if not request.config.getoption("--runslow", default=False):
        pytest.skip("slow: run with --runslow")
    out = run_example("quickstart.py", quick=False, timeout=600)
    assert "model restored: True" in out
    rows = _table(out)
    assert len(rows) == 4


DOC_FILES = [
    "README.md",
    "docs/index.md",
    "docs/api.md",
    "docs/cli.md",
    "docs/data_and_bench.md",
    "docs/methods/bn_adapt.md",
    "docs/methods/tent.md",
    "docs/methods/ncttt.md",
    "docs/methods/clust3.md",
    "docs/methods/ttt.md",
    "docs/methods/ttt_pp.md",
    "docs/methods/ocl.md",
]

_RUN_DOC_BLOCKS = r"""
import re, sys, time, traceback
import torch
torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a busy CI box
failed = []
for path in sys.argv[1:]:
    t0 = time.perf_counter()
    text = open(path, encoding="utf-8").read()
    code = "\n\n".join(re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M))
    try:
        exec(compile(code, path, "exec"), {"__name__": "__doc_example__"})
        print("OK", path, f"{time.perf_counter() - t0:.1f}s")
    except Exception:
        failed.append(path)
        print("FAILED", path)
        traceback.print_exc()
sys.exit(1 if failed else 0)
"""


def test_docs_python_blocks_run() -> None:
    """Every ```python block of the README and docs runs (each file in a fresh namespace, one process)."""
    root = EXAMPLES.parent
    files = [f for f in DOC_FILES if (root / f).exists()]
    assert "README.md" in files
    res = subprocess.run(
        [sys.executable, "-c", _RUN_DOC_BLOCKS, *files],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert res.stdout.count("OK ") == len(files), res.stdout
