"""CIFAR-10 / CIFAR-100 python-release loaders on tiny pickle files written here in the official layout."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptkit.data.datasets import CIFAR10, CIFAR100, read_cifar_batch


def _write_batch(path: Path, data: np.ndarray, labels: list[int], key: bytes = b"labels", protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {b"batch_label": b"fake", key: labels, b"data": data, b"filenames": [b"a.png"] * len(labels)}
    with open(path, "wb") as f:
        pickle.dump(blob, f, protocol=protocol)


def _fake_cifar10(root: Path, n: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(0)
    out = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(n)]
        _write_batch(root / "cifar-10-batches-py" / name, data, labels, protocol=2 + i % 3)
        out[name] = (data, labels)
    return out


def test_cifar10_train_and_test_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTKIT_DATA", raising=False)
    files = _fake_cifar10(tmp_path)
    train, test = CIFAR10(tmp_path, train=True), CIFAR10(tmp_path)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.targets.tolist() == [lab for k in range(1, 6) for lab in files[f"data_batch_{k}"][1]]
    assert len(test) == 3 and test.targets.dtype == torch.int64
    data = files["test_batch"][0]
    # channel-major rows: 1024 red values (row-major 32x32), then green, then blue
    assert int(test.images[1, 0, 0, 5]) == data[1, 5]
    assert int(test.images[1, 1, 2, 3]) == data[1, 1024 + 2 * 32 + 3]
    assert int(test.images[1, 2, 31, 31]) == data[1, 3071]
    x, y = test[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert y == files["test_batch"][1][2]
    xs, ys = test.tensors()
    assert torch.equal(xs[2], x) and torch.equal(ys, test.targets)
    assert test.classes is not None and len(test.classes) == 10
    assert CIFAR10(tmp_path / "cifar-10-batches-py").targets.tolist() == test.targets.tolist()  # the folder itself


def test_cifar10_env_var_and_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTKIT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/\{data_batch_1.*data_batch_5\}.*download"):
        CIFAR10(tmp_path, train=True)
    with pytest.raises(FileNotFoundError, match="ADAPTKIT_DATA"):
        CIFAR10()
    _fake_cifar10(tmp_path / "data")
    monkeypatch.setenv("ADAPTKIT_DATA", str(tmp_path / "data"))
    assert len(CIFAR10(tmp_path / "elsewhere", train=True)) == 15
    os.remove(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3")  # an incomplete split is not used
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10(train=True)


def test_cifar100_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTKIT_DATA", raising=False)
    d = tmp_path / "cifar-100-python"
    _write_batch(d / "train", np.zeros((4, 3072), np.uint8), [0, 99, 50, 7], key=b"fine_labels")
    _write_batch(d / "test", np.full((2, 3072), 255, np.uint8), [98, 1], key=b"fine_labels")
    train, test = CIFAR100(tmp_path, train=True), CIFAR100(tmp_path)
    assert train.targets.tolist() == [0, 99, 50, 7] and test.targets.tolist() == [98, 1]
    assert float(test[0][0].min()) == 1.0
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/\{test\}"):
        CIFAR100(tmp_path / "none")


def test_numpy1_pickles_load(tmp_path: Path) -> None:
    """The official files were written by numpy 1 (``numpy.core.multiarray``); numpy 2 renamed the module."""
    raw = pickle.dumps({b"data": np.arange(3072, dtype=np.uint8)[None], b"labels": [4]}, protocol=2)
    if b"numpy._core.multiarray" in raw:
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "b").write_bytes(raw)
    x, y = read_cifar_batch(tmp_path / "b")
    assert x.shape == (1, 3, 32, 32) and y.tolist() == [4] and int(x[0, 0, 0, 1]) == 1


def test_read_cifar_batch_refuses_code_and_wrong_keys(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_cifar_batch(tmp_path / "evil")
    _write_batch(tmp_path / "c100", np.zeros((1, 3072), np.uint8), [3], key=b"fine_labels")
    with pytest.raises(ValueError, match="labels"):
        read_cifar_batch(tmp_path / "c100")
    _write_batch(tmp_path / "bad", np.zeros((2, 3072), np.uint8), [3])
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        read_cifar_batch(tmp_path / "bad")
