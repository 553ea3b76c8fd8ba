"""Loaders on small files written here in the real formats."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptkit.data.datasets import CIFARC, FashionMNIST, imagenet_c, read_idx, subset


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    head = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(head + body)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (7,), dtype=np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", imgs, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels, gz)
    ds = FashionMNIST(tmp_path)
    assert len(ds) == 7 and ds.images.shape == (7, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
    assert ds.targets.tolist() == labels.tolist()
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    assert y == int(labels[3])


def test_fashion_mnist_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.ones((2,), np.uint8), False)
    monkeypatch.setenv("ADAPTKIT_DATA", str(tmp_path))
    assert FashionMNIST(root=tmp_path / "nowhere").targets.tolist() == [1, 1]


def test_fashion_mnist_missing_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("adaptkit.data.datasets.DEBIAN_FASHION_MNIST", str(tmp_path / "none"))
    monkeypatch.delenv("ADAPTKIT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(tmp_path)


def test_read_idx_int32_big_endian(tmp_path: Path) -> None:
    arr = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    _write_idx(tmp_path / "a-idx2", arr, False)
    assert read_idx(tmp_path / "a-idx2").tolist() == arr.tolist()


def test_read_idx_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04\x05")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")


def test_cifar_c_npy_layout(tmp_path: Path) -> None:
    n = 3
    imgs = np.arange(5 * n * 32 * 32 * 3, dtype=np.int64).reshape(5 * n, 32, 32, 3) % 256
    np.save(tmp_path / "fog.npy", imgs.astype(np.uint8))
    np.save(tmp_path / "labels.npy", np.arange(5 * n) % 10)
    ds = CIFARC(tmp_path, "fog", 2)
    assert len(ds) == n and ds.images.shape == (n, 3, 32, 32)
    assert torch.equal(ds.images[0], torch.from_numpy(imgs[n].astype(np.uint8)).permute(2, 0, 1))
    assert ds.targets.tolist() == [3, 4, 5]
    with pytest.raises(FileNotFoundError, match="fog"):
        CIFARC(tmp_path, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        CIFARC(tmp_path, "fog", 6)


def test_imagenet_c_folder_layout(tmp_path: Path) -> None:
    from PIL import Image

    for wnid in ("n01", "n02"):
        d = tmp_path / "snow" / "3" / wnid
        d.mkdir(parents=True)
        Image.fromarray(np.full((240, 250, 3), 100, np.uint8)).save(d / "a.JPEG")
    ds = imagenet_c(tmp_path, "snow", 3)
    x, y = ds[1]
    assert x.shape == (3, 224, 224) and y == 1
    with pytest.raises(FileNotFoundError):
        imagenet_c(tmp_path, "snow", 4)


def test_subset_is_seeded() -> None:
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    a, b = subset(x, y, 4, seed=1), subset(x, y, 4, seed=1)
    assert torch.equal(a[1], b[1]) and len(a[1]) == 4
    assert subset(x, y, None)[1] is y


def test_corrupted_view_is_lazy_seeded_and_cached(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    from adaptkit.data.datasets import CorruptedView

    clean = TensorDataset((torch.rand(5, 1, 28, 28) * 255).to(torch.uint8), torch.arange(5))
    view = CorruptedView(clean, "shot_noise", 3, seed=1, cache_dir=tmp_path)
    a = [view[i][0] for i in range(5)]
    assert all(x.shape == (1, 28, 28) and x.dtype == torch.float32 for x in a)
    assert len(list(view.cache.glob("*.pt"))) == 5  # type: ignore[union-attr]
    fresh = CorruptedView(clean, "shot_noise", 3, seed=1)  # no cache: same images from the same seeds
    assert all(torch.equal(a[i], fresh[i][0]) for i in (4, 0, 2))
    assert not torch.equal(a[0], CorruptedView(clean, "shot_noise", 3, seed=2)[0][0])
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError):
        CorruptedView(clean, "shot_nois", 3)


def test_corrupted_dataset_cache_survives_concurrent_writers(tmp_path: Path) -> None:
    """Several workers filling the same cache entry at once (parallel benchmark runs) must not collide on a
    shared temporary file; all get the same images."""
    import threading

    from adaptkit.data.datasets import CorruptedDataset

    x = torch.rand(6, 1, 12, 12)
    y = torch.arange(6)
    out: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            out.append(CorruptedDataset(x, y, "gaussian_noise", 3, seed=1, cache_dir=tmp_path).images)
        except BaseException as e:  # pragma: no cover - the failure being tested
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(o, out[0]) for o in out)
    assert not list(tmp_path.rglob("*.tmp"))
