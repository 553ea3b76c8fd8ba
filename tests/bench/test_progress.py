"""Progress of long loops (``adaptkit._progress``): a tqdm bar on a terminal, a few summary lines elsewhere, as
used by the bench (corrupting, evaluating, training source models) and by ``train_head``."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from adaptkit._progress import is_interactive, progress
from adaptkit.bench import BenchConfig, run_bench
from adaptkit.cli import main
from adaptkit.train.trainer import _progress as trainer_progress

#: the only lines a non-terminal log gets: start, quarters, end
LINE = re.compile(r"^[^\n]+: (\d+ steps?|started|\d+/\d+ \(\d+%\), \d+\.\d s|done, \d+ steps? in \d+\.\d s)$")


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "adaptkit-cache"))


def _lines(text: str) -> list[str]:
    lines = text.splitlines()
    assert "\r" not in text and all(LINE.match(line) for line in lines), text
    return lines


@pytest.mark.parametrize(
    ("total", "marks"),
    [(8, ["2/8 (25%)", "4/8 (50%)", "6/8 (75%)"]), (10, ["3/10 (30%)", "5/10 (50%)", "8/10 (80%)"]),
     (2, ["1/2 (50%)"]), (1, []), (0, [])],
)  # fmt: skip
def test_log_lines_on_a_non_terminal(total: int, marks: list[str]) -> None:
    log = io.StringIO()
    assert list(progress(range(total), total, "work", stream=log)) == list(range(total))
    lines = _lines(log.getvalue())
    steps = "1 step" if total == 1 else f"{total} steps"
    assert lines[0] == f"work: {steps}" and lines[-1].startswith(f"work: done, {steps} in ")
    assert [line.split(": ")[1].split(",")[0] for line in lines[1:-1]] == marks


def test_log_lines_without_a_length() -> None:
    log = io.StringIO()
    assert list(progress((i for i in range(5)), desc="gen", stream=log)) == list(range(5))
    assert [line.split(",")[0] for line in _lines(log.getvalue())] == ["gen: started", "gen: done"]


def test_length_taken_from_the_iterable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # the default stream, not a terminal
    log = sys.stderr
    list(progress([1, 2, 3, 4], desc="list"))
    assert _lines(log.getvalue())[0] == "list: 4 steps"  # type: ignore[attr-defined]


def test_a_terminal_gets_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    tqdm = pytest.importorskip("tqdm")
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)  # stderr says it is a terminal
    assert is_interactive(term) and not is_interactive(io.StringIO()) and not is_interactive(object())
    bar = progress(range(6), 6, "bar")
    assert isinstance(bar, tqdm.tqdm)
    assert list(bar) == list(range(6))
    assert "bar" in term.getvalue() and "\r" in term.getvalue()  # a bar redrawn in place, then cleared
    assert "steps" not in term.getvalue()


def test_a_terminal_without_tqdm_gets_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    term = Terminal()
    assert list(progress(range(4), 4, "plain", stream=term)) == list(range(4))
    assert len(_lines(term.getvalue())) == 5


def test_disabled_is_the_iterable_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())
    it = iter(range(3))
    assert progress(it, 3, "off", enabled=False) is it
    assert trainer_progress(it, False, "off", 3) is it
    assert sys.stderr.getvalue() == ""  # type: ignore[attr-defined]
    monkeypatch.setattr(sys, "stderr", None)  # no stderr at all (pythonw): nothing to report to
    assert progress(it, 3, "none") is it


def test_train_head_helper_logs_lines_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()  # pytest's capture
    assert list(trainer_progress(range(4), True, "train_head epoch 1/1", 4)) == list(range(4))
    lines = _lines(capsys.readouterr().err)
    assert lines[0] == "train_head epoch 1/1: 4 steps" and len(lines) == 5


def test_bench_log_is_a_few_lines_per_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bench run with progress on, logged to a file or a pipe: a few summary lines per loop, no bars."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()  # fmt: skip
    data = (torch.randint(0, 256, (48, 1, 12, 12), dtype=torch.uint8), torch.arange(48) % 3)
    cfg = BenchConfig(
        model="tiny", dataset="user", methods=["source", "bn_adapt"], corruptions=["gaussian_noise", "contrast"],
        batch_size=4, progress=True, shift_score=False,
    )  # fmt: skip
    run_bench(cfg, write=False, model=model, data=data)
    lines = _lines(capsys.readouterr().err)
    # corrupting 2 domains: start, 1/2, done; per method, 2 shifts x 12 batches and the clean set's 12: 5 lines each
    assert len(lines) == 3 + 2 * 2 * 5
    assert lines[0] == "corrupting test data: 2 steps" and "source: 24 steps" in lines
    assert "bn_adapt: 12/24 (50%)" in {line.split(",")[0] for line in lines}


def test_bench_cli_progress_on_a_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``adaptkit bench`` without ``--quiet`` writes summary lines to a non-terminal stderr; ``--quiet`` none."""
    argv = ["bench", "--dataset", "synthetic", "--corruptions", "contrast", "--methods", "source", "--n-samples",
            "32", "--batch-size", "8", "--no-shift-score", "--no-clean"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    lines = _lines(capsys.readouterr().err)
    assert lines[0] == "corrupting test data: 1 step" and lines[-1].startswith("source: done, 4 steps in ")
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
