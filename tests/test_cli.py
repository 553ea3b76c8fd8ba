"""The ``adaptkit`` console script (``adaptkit.cli.main``) and ``python -m adaptkit``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import adaptkit
from adaptkit.cli import build_parser, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"adaptkit {adaptkit.__version__}"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "layers" in out and "methods" in out


def test_layers_torchvision_resnet18(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "resnet18", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.bn1" in out and "BatchNorm2d" in out
    assert "conv1" in out  # all modules, not only norm layers
    assert "fc" in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("summary: 20 BatchNorm, 0 GroupNorm, 0 LayerNorm layers (0 frozen)")
    assert "0..4" in summary and "1=layer1" in summary


def test_layers_norm_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "resnet18", "--norm-only", "--source", "torchvision"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines()[2:] if not line.startswith("summary:")]
    assert len(table) == 20
    assert "conv1 " not in out
    assert all("BatchNorm2d" in line for line in table)


def test_layers_torchvision_segmentation_offline(capsys: pytest.CaptureFixture[str]) -> None:
    """Segmentation builders default to an ImageNet backbone: the CLI must not download it (no network here)."""
    assert main(["layers", "lraspp_mobilenet_v3_large", "--norm-only", "--num-classes", "4"]) == 0
    out = capsys.readouterr().out
    assert "classifier.cbr.1" in out
    summary = out.strip().splitlines()[-1]
    assert "0..16" in summary and "1=backbone.1," in summary and "classifier" not in summary


def test_layers_timm(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    assert main(["layers", "resnet18", "--source", "timm", "--norm-only"]) == 0
    out = capsys.readouterr().out
    assert "(timm, random weights)" in out
    assert "summary: 20 BatchNorm" in out
    assert "1=layer1" in out  # timm feature_info stages


def test_layers_timm_layernorm_net(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    assert main(["layers", "test_vit", "--norm-only"]) == 0  # auto: not a torchvision name, found in timm
    out = capsys.readouterr().out
    assert "LayerNorm" in out
    assert "0 BatchNorm" in out


@pytest.mark.parametrize("source", ["auto", "torchvision"])
def test_unknown_model_exit_code_2(capsys: pytest.CaptureFixture[str], source: str) -> None:
    assert main(["layers", "resnt18", "--source", source]) == 2
    err = capsys.readouterr().err
    assert "unknown" in err and "'resnt18'" in err
    assert "resnet18" in err  # close match


def test_bad_option_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "resnet18", "--source", "keras"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == adaptkit.list_methods()
    for line in lines:
        name = line.split()[0]
        cls = adaptkit.get_method(name)
        assert f"{cls.__name__}: " in line
        assert cls.__doc__.strip().splitlines()[0] in line


def test_parser_has_subcommands() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"layers", "methods"} <= set(sub.choices)


def test_python_m_adaptkit_and_no_timm_import() -> None:
    code = (
        "import sys, runpy; sys.argv = ['adaptkit', 'layers', 'resnet18', '--norm-only'];\n"
        "try:\n    runpy.run_module('adaptkit', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'timm' not in sys.modules, 'the CLI imported timm for a torchvision model'\n"
        "print('OK')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "summary: 20 BatchNorm" in res.stdout and res.stdout.strip().endswith("OK")


def test_bench_unknown_model_exit_code_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``adaptkit bench --model`` resolves names with the library's ``adaptkit.models.build_model``; its lookup
    error (a ValueError) becomes the command's one-line error, as for ``adaptkit layers``."""
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path))
    argv = ["bench", "--model", "resnt18", "--dataset", "synthetic", "--corruptions", "contrast", "--n-samples", "8"]
    assert main([*argv, "--quiet", "--no-shift-score"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptkit bench: error: unknown model 'resnt18'") and "resnet18" in err
    assert "Traceback" not in err
