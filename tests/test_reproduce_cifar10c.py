"""``examples/reproduce_cifar10c.py`` end to end on tiny fake CIFAR-10 (pickles) and CIFAR-10-C (.npy) files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from adaptkit.functional.ncttt import ncttt_noisy_views

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce_cifar10c.py"
CORRUPTIONS = ["gaussian_noise", "fog"]
METHODS = ["Source", "PTBN", "Tent", "NC-TTT"]


def _fake_data(root: Path, per_batch: int = 8, per_severity: int = 20) -> None:
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        blob = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                b"labels": rng.integers(0, 10, per_batch).tolist()}  # fmt: skip
        with open(d / name, "wb") as f:
            pickle.dump(blob, f, protocol=2)
    c = root / "CIFAR-10-C"
    c.mkdir()
    np.save(c / "labels.npy", rng.integers(0, 10, 5 * per_severity).astype(np.uint8))
    for name in CORRUPTIONS:
        np.save(c / f"{name}.npy", rng.integers(0, 256, (5 * per_severity, 32, 32, 3), dtype=np.uint8))


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["--cifar-root", str(tmp_path), "--cifar-c-root", str(tmp_path / "CIFAR-10-C"), "--epochs", "1",
            "--batch-size", "8", "--runs", "1", "--device", "cpu", "--arch", "resnet10", "--width", "8",
            "--embed-dim", "8", "--steps", "2", "--workers", "0", "--checkpoint", str(tmp_path / "ckpt.pt"),
            "--corruptions", *CORRUPTIONS, *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_reproduce_cifar10c_end_to_end(tmp_path: Path) -> None:
    _fake_data(tmp_path)
    out = tmp_path / "out" / "result.json"
    res = _run(tmp_path, "--limit", "16", "--out", str(out))
    assert "epoch 1/1 done" in res.stdout and "| corruption | Source | paper |" in res.stdout
    assert "| gaussian_noise | " in res.stdout and "| 21.01 |" in res.stdout  # the paper's Source cell
    report = json.loads(out.read_text())
    for m in METHODS:
        for c in [*CORRUPTIONS, "mean"]:
            cell = report["results"][m][c]
            assert len(cell["runs"]) == 1 and 0.0 <= cell["mean"] <= 100.0 and cell["std"] == 0.0
            assert c == "mean" or abs(cell["mean"] * 0.16 - round(cell["mean"] * 0.16)) < 1e-6  # 16 images
    assert report["paper"]["gaussian_noise"]["NC-TTT"] == 75.30 and report["paper"]["tent_mean"] == 69.93
    assert report["config"]["limit"] == 16 and report["train_history"][0]["epoch"] == 1.0
    state = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and json.loads(state["signature"])["layers"] == ["layer2"] and "model" in state

    # a finished checkpoint skips training; the same seed and images give the same source accuracy
    res = _run(tmp_path, "--limit", "16", "--out", str(tmp_path / "again.json"), "--corruptions", "fog")
    assert "resuming from" in res.stdout and "epoch 1/1 done" not in res.stdout
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["results"]["Source"]["fog"] == report["results"]["Source"]["fog"]
    assert set(again["results"]["NC-TTT"]) == {"fog", "mean"}


def test_ncttt_labels_finite_in_half_precision() -> None:
    """``--amp`` trains the flat head under float16 autocast: ``D ln(alpha)`` (D = C' x 16 x 16) overflows float16."""
    z = torch.randn(4, 64, 16, 16).half()
    _, labels = ncttt_noisy_views(z, 0.015, 0.1 / 0.015, False, torch.Generator().manual_seed(0))
    assert torch.isfinite(labels).all() and labels.flatten().tolist() == [1.0] * 4 + [0.0] * 4
