"""Datasets from disk: Fashion-MNIST (IDX), CIFAR-10 / CIFAR-100 (python pickles), CIFAR-10-C / CIFAR-100-C
(.npy), ImageNet-C (folders), and a corrupted-on-the-fly view of any clean dataset with an on-disk cache.

No function here downloads anything unless asked (``download=True`` for Fashion-MNIST via torchvision).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from adaptkit._version import __version__ as _version

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32}


def as_unit_float(x: torch.Tensor) -> torch.Tensor:
    """8-bit images to floats in ``[0, 1]``; any other tensor is returned as it is.

    Example:
        >>> import torch
        >>> from adaptkit.data.datasets import as_unit_float
        >>> as_unit_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist()
        [0.0, 1.0]
    """
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (MNIST format, optionally ``.gz``) into a tensor.

    Example:
        >>> import gzip, struct, tempfile, os
        >>> from adaptkit.data.datasets import read_idx
        >>> p = os.path.join(tempfile.mkdtemp(), "x-idx1-ubyte.gz")
        >>> with gzip.open(p, "wb") as f:
        ...     _ = f.write(struct.pack(">HBBI", 0, 0x08, 1, 3) + bytes([7, 8, 9]))
        >>> read_idx(p).tolist()
        [7, 8, 9]
    """
    opener: Callable[..., Any] = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic {zero:#x}, type {code:#x})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    dtype = _IDX_DTYPES[code]
    t = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=dtype)
    if dtype != torch.uint8 and dtype != torch.int8:
        t = t.view(torch.uint8).view(-1, t.element_size()).flip(1).reshape(-1).view(dtype)  # big-endian
    return t.reshape(shape).clone()


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        for cand in (root / name, root / "fashion-mnist" / name, root / "FashionMNIST" / "raw" / name):
            if cand.is_file():
                return cand
    return None


def fashion_mnist_roots(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for Fashion-MNIST IDX files: ``root``, ``$ADAPTKIT_DATA``, Debian's package folder."""
    roots = [Path(root)] if root is not None else []
    if os.environ.get("ADAPTKIT_DATA"):
        roots.append(Path(os.environ["ADAPTKIT_DATA"]))
    roots.append(Path(DEBIAN_FASHION_MNIST))
    return roots


class _Uint8Images(Dataset):
    """A dataset held as uint8 ``images`` ``(N, C, H, W)`` and ``targets`` ``(N,)``; items are floats in [0, 1]."""

    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float() / 255.0, int(self.targets[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as ``(float images in [0,1], labels)``."""
        return self.images.float() / 255.0, self.targets


class FashionMNIST(_Uint8Images):
    """Fashion-MNIST from IDX files, as float images ``(1, 28, 28)`` in ``[0, 1]`` and integer labels.

    Search order: ``root``, ``$ADAPTKIT_DATA``, ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``); otherwise torchvision's download when ``download=True``. ``images``
    (uint8 ``(N, 1, 28, 28)``) and ``targets`` give the whole split as tensors for fast batched use.

    Args:
        root: a folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        train: the 60k training split, else the 10k test split.
        download: fall back to ``torchvision.datasets.FashionMNIST(download=True)`` into ``root``.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | os.PathLike[str] | None = None, train: bool = False, download: bool = False):
        prefix = "train" if train else "t10k"
        for r in fashion_mnist_roots(root):
            img, lab = _find_idx(r, f"{prefix}-images-idx3-ubyte"), _find_idx(r, f"{prefix}-labels-idx1-ubyte")
            if img is not None and lab is not None:
                self.images = read_idx(img).unsqueeze(1)
                self.targets = read_idx(lab).long()
                self.source = str(img.parent)
                return
        if not download:
            searched = ", ".join(str(r) for r in fashion_mnist_roots(root))
            raise FileNotFoundError(
                f"Fashion-MNIST IDX files not found (searched {searched}). Install them with "
                "`apt-get install dataset-fashion-mnist`, set $ADAPTKIT_DATA to a folder holding them, or pass "
                "download=True (needs internet)."
            )
        import torchvision

        target = Path(root or os.environ.get("ADAPTKIT_DATA") or Path.home() / ".cache" / "adaptkit")
        try:
            ds = torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        except Exception as e:  # offline
            raise RuntimeError(
                f"could not download Fashion-MNIST ({e}); this machine may be offline. Install the Debian package "
                "dataset-fashion-mnist or copy the IDX files to $ADAPTKIT_DATA."
            ) from e
        self.images = ds.data.unsqueeze(1).clone()
        self.targets = ds.targets.long().clone()
        self.source = str(target)


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

#: the only globals a CIFAR python pickle may name (numpy array reconstruction; bytes under protocol 2)
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}  # fmt: skip


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dicts, lists and strings only (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a CIFAR python batch file")
        import importlib

        import numpy as np

        if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy 2 renamed numpy.core
            module = module.replace("numpy.core", "numpy._core", 1)
        return getattr(importlib.import_module(module), name)


def read_cifar_batch(path: str | os.PathLike[str], label_key: bytes = b"labels") -> tuple[torch.Tensor, torch.Tensor]:
    """One file of the official CIFAR python release as ``(uint8 images (N, 3, 32, 32), labels (N,))``.

    The file is a pickled dict with ``b"data"`` (``N x 3072`` uint8, channel-major: 1024 red, 1024 green,
    1024 blue values per row) and ``label_key`` (``b"labels"``; CIFAR-100: ``b"fine_labels"`` or
    ``b"coarse_labels"``). Only numpy arrays and plain containers are unpickled, never arbitrary objects.

    Example:
        >>> import os, pickle, tempfile
        >>> import numpy as np
        >>> from adaptkit.data.datasets import read_cifar_batch
        >>> p = os.path.join(tempfile.mkdtemp(), "test_batch")
        >>> with open(p, "wb") as f:
        ...     pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 5]}, f)
        >>> x, y = read_cifar_batch(p)
        >>> tuple(x.shape), y.tolist()
        ((2, 3, 32, 32), [3, 5])
    """
    import numpy as np

    with open(path, "rb") as f:
        blob = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(blob, dict) or b"data" not in blob or label_key not in blob:
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path} is not a CIFAR python batch with b'data' and {label_key!r} (found {keys})")
    data = np.asarray(blob[b"data"], dtype=np.uint8)
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    targets = torch.as_tensor(np.asarray(blob[label_key], dtype=np.int64))
    if len(images) != len(targets):
        raise ValueError(f"{path}: {len(images)} images but {len(targets)} labels")
    return images, targets


class CIFAR10(_Uint8Images):
    """CIFAR-10 from the official python release, as float images ``(3, 32, 32)`` in ``[0, 1]`` and labels.

    Layout (``cifar-10-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html, extracted):
    ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (``root`` may also be that folder itself).
    Search order: ``root``, ``$ADAPTKIT_DATA``. Nothing is downloaded. ``images`` (uint8 ``(N, 3, 32, 32)``)
    and ``targets`` give the whole split as tensors.

    Args:
        root: the folder holding ``cifar-10-batches-py`` (or that folder).
        train: the 50k training split (five batches), else the 10k test split.
    """

    classes: tuple[str, ...] | None = CIFAR10_CLASSES
    folder = "cifar-10-batches-py"
    label_key = b"labels"
    train_files: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files: tuple[str, ...] = ("test_batch",)
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

    def __init__(self, root: str | os.PathLike[str] | None = None, train: bool = False) -> None:
        files = self.train_files if train else self.test_files
        roots = [Path(root)] if root is not None else []
        if os.environ.get("ADAPTKIT_DATA"):
            roots.append(Path(os.environ["ADAPTKIT_DATA"]))
        for r in roots:
            for d in (r / self.folder, r):
                if all((d / f).is_file() for f in files):
                    parts = [read_cifar_batch(d / f, self.label_key) for f in files]
                    self.images = torch.cat([p[0] for p in parts])
                    self.targets = torch.cat([p[1] for p in parts])
                    self.source = str(d)
                    return
        searched = ", ".join(str(r) for r in roots) or "nothing: pass root= or set $ADAPTKIT_DATA"
        raise FileNotFoundError(
            f"{type(self).__name__} files not found (searched {searched}). Expected "
            f"<root>/{self.folder}/{{{', '.join(files)}}} (the official python release: download {self.url} and "
            "extract it under root, or set $ADAPTKIT_DATA to that folder). adaptkit does not download it."
        )


class CIFAR100(CIFAR10):
    """CIFAR-100 from the official python release (``<root>/cifar-100-python/{train, test}``, fine labels
    ``0..99``); see :class:`CIFAR10` for the search order and attributes.

    Args:
        root: the folder holding ``cifar-100-python`` (or that folder).
        train: the 50k training split, else the 10k test split.
    """

    classes = None
    folder = "cifar-100-python"
    label_key = b"fine_labels"
    train_files = ("train",)
    test_files = ("test",)
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


class CIFARC(_Uint8Images):
    """CIFAR-10-C / CIFAR-100-C from the released ``.npy`` layout.

    ``<root>/<corruption>.npy`` holds ``(5 * n, 32, 32, 3)`` uint8 images, severities 1-5 in blocks of
    ``n`` (10,000 in the release); ``<root>/labels.npy`` the matching labels.

    Args:
        root: the extracted ``CIFAR-10-C`` (or ``CIFAR-100-C``) folder.
        corruption: e.g. ``"gaussian_noise"``.
        severity: 1-5.
        n: images per severity (inferred from the file when ``None``).
    """

    def __init__(self, root: str | os.PathLike[str], corruption: str, severity: int, n: int | None = None):
        import numpy as np

        root = Path(root)
        path = root / f"{corruption}.npy"
        if not path.is_file():
            have = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
            raise FileNotFoundError(f"{path} not found; corruptions in {root}: {have or 'none'}")
        if not 1 <= int(severity) <= 5:
            raise ValueError(f"severity must be 1..5, got {severity}")
        arr = np.load(path, mmap_mode="r")
        labels = np.load(root / "labels.npy")
        n = n or arr.shape[0] // 5
        lo, hi = (int(severity) - 1) * n, int(severity) * n
        self.images = torch.from_numpy(np.array(arr[lo:hi])).permute(0, 3, 1, 2).contiguous()  # mmap is read-only
        self.targets = torch.from_numpy(np.asarray(labels[lo:hi])).long()


def imagenet_c(
    root: str | os.PathLike[str], corruption: str, severity: int, transform: Callable[[Any], Any] | None = None
) -> Dataset:
    """ImageNet-C from its folder layout ``<root>/<corruption>/<severity>/<wnid>/*.JPEG`` (a torchvision
    ``ImageFolder``; default transform: center crop 224 and ``ToTensor``, no normalisation - put that in
    the model)."""
    import torchvision
    from torchvision import transforms as T

    path = Path(root) / corruption / str(int(severity))
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: expected <root>/<corruption>/<severity>/<class>/*.JPEG")
    transform = transform or T.Compose([T.CenterCrop(224), T.ToTensor()])
    return torchvision.datasets.ImageFolder(str(path), transform=transform)


class CorruptedDataset(_Uint8Images):
    """A clean tensor dataset corrupted on the fly (once, in batches) with an optional on-disk cache.

    Args:
        images: clean float images ``(N, C, H, W)`` in ``[0, 1]`` (or uint8).
        targets: labels ``(N,)``.
        corruption: a name from ``adaptkit.data.corruptions``.
        severity: 1-5.
        seed: the corruption randomness (the same seed gives the same images).
        cache_dir: where to keep the corrupted uint8 tensor (keyed by data hash, corruption, severity,
            seed, preset and adaptkit version); ``None`` disables the cache.
        batch_size: images corrupted per call.
        preset: corruption constants (``"auto"`` picks by image size).
        device: where to run the corruption.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        corruption: str,
        severity: int,
        seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 500,
        preset: str = "auto",
        device: str | torch.device = "cpu",
    ) -> None:
        self.targets = targets
        self.corruption, self.severity, self.seed = corruption, int(severity), int(seed)
        key = None
        if cache_dir is not None:
            h = hashlib.sha1(images.contiguous().cpu().numpy().tobytes()[: 1 << 22])
            h.update(f"{images.shape}|{corruption}|{severity}|{seed}|{preset}|{_version}".encode())
            key = Path(cache_dir) / f"{corruption}-s{severity}-seed{seed}-{h.hexdigest()[:16]}.pt"
            if key.is_file():
                self.images = torch.load(key, weights_only=True)
                return
        self.images = corrupt_tensor(images, corruption, severity, seed, batch_size, preset, device)
        if key is not None:
            key.parent.mkdir(parents=True, exist_ok=True)
            tmp = key.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # concurrent writers: own temp
            torch.save(self.images, tmp)
            tmp.replace(key)


class CorruptedView(Dataset):
    """Any clean map-style dataset of ``(image, label)`` pairs, corrupted lazily item by item.

    Suited to datasets too large to hold in memory (ImageNet-size): item ``i`` is corrupted with a generator
    seeded from ``(seed, i)``, so every access gives the same image whatever the order or the DataLoader
    workers; with ``cache_dir`` each corrupted item is stored once as an 8-bit tensor file.

    Args:
        dataset: returns ``(image (C, H, W) float in [0, 1] or uint8, label)``.
        corruption / severity / preset: as in :func:`adaptkit.data.corruptions.corrupt`.
        seed: base seed.
        cache_dir: folder for the per-item cache (keyed by corruption, severity, seed, preset and version).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from adaptkit.data.datasets import CorruptedView
        >>> clean = TensorDataset(torch.rand(4, 3, 32, 32), torch.arange(4))
        >>> view = CorruptedView(clean, "gaussian_noise", 5, seed=0)
        >>> x, y = view[2]
        >>> x.shape, int(y), torch.equal(x, view[2][0])
        (torch.Size([3, 32, 32]), 2, True)
    """

    def __init__(
        self,
        dataset: Any,
        corruption: str,
        severity: int,
        seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        preset: str = "auto",
    ) -> None:
        from adaptkit.data.corruptions import get_corruption

        get_corruption(corruption)  # fail early on unknown names
        self.dataset, self.corruption, self.severity = dataset, corruption, int(severity)
        self.seed, self.preset = int(seed), preset
        self.cache = None
        if cache_dir is not None:
            self.cache = Path(cache_dir) / f"{corruption}-s{severity}-seed{seed}-{preset}-v{_version}"
            self.cache.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        from adaptkit.data.corruptions import corrupt

        x, y = self.dataset[i]
        path = None if self.cache is None else self.cache / f"{i}.pt"
        if path is not None and path.is_file():
            return torch.load(path, weights_only=True).float() / 255.0, y
        x = as_unit_float(x).float()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        out = corrupt(x[None], self.corruption, self.severity, generator=gen, preset=self.preset)[0]
        out8 = (out.clamp(0, 1) * 255.0).round().to(torch.uint8)
        if path is not None:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(out8, tmp)
            tmp.replace(path)
        return out8.float() / 255.0, y


def corrupt_tensor(
    images: torch.Tensor,
    corruption: str,
    severity: int,
    seed: int = 0,
    batch_size: int = 500,
    preset: str = "auto",
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Corrupt a whole image tensor in batches; returns uint8 ``(N, C, H, W)`` (8-bit, like the released sets)."""
    from adaptkit.data.corruptions import corrupt

    gen = torch.Generator(device=device).manual_seed(int(seed))
    out = []
    for lo in range(0, len(images), batch_size):
        x = images[lo : lo + batch_size].to(device)
        x = as_unit_float(x).float()
        y = corrupt(x, corruption, severity, generator=gen, preset=preset)
        out.append((y.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu())
    return torch.cat(out) if out else torch.empty(0, *images.shape[1:], dtype=torch.uint8)


def subset(images: torch.Tensor, targets: torch.Tensor, n: int | None, seed: int = 0) -> tuple[Any, Any]:
    """A seeded random subset of ``n`` items (all when ``n`` is ``None`` or too large)."""
    if n is None or n >= len(targets):
        return images, targets
    idx = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], targets[idx]


__all__: Sequence[str] = [
    "CIFAR10",
    "CIFAR100",
    "CIFARC",
    "CorruptedDataset",
    "CorruptedView",
    "as_unit_float",
    "FashionMNIST",
    "corrupt_tensor",
    "fashion_mnist_roots",
    "imagenet_c",
    "read_cifar_batch",
    "read_idx",
    "subset",
]
