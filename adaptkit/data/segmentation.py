"""Semantic segmentation test sets from disk: Cityscapes (``gtFine``) and ACDC, in their official folder layouts.

Both use the 19 Cityscapes train classes (trainIds ``0..18``) with ``255`` = ignore. Nothing is downloaded:
point ``root`` at the unpacked release. PNGs are read with PIL (a torchvision dependency), imported lazily.

- :func:`cityscapes_label_to_train_id`: the official 34 labelIds -> 19 trainIds table (cityscapesScripts
  ``helpers/labels.py``) as one vectorised 256-entry lookup.
- :class:`Cityscapes`: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/{split}/{city}/*_gtFine_*.png``.
- :class:`ACDC`: ``rgb_anon/{condition}/{split}/{sequence}/*_rgb_anon.png`` + ``gt/.../*_gt_labelTrainIds.png``.
- :func:`stack`: a whole split as two tensors (8-bit by default) for in-memory benchmarks.

Items are ``(image, mask)``: a float image ``(3, H, W)`` in ``[0, 1]`` and an int64 mask ``(H, W)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = [
    "ACDC",
    "ACDC_CONDITIONS",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
    "Cityscapes",
    "SegmentationFolder",
    "SegSample",
    "cityscapes_colorize",
    "cityscapes_label_to_train_id",
    "read_label",
    "read_rgb",
    "stack",
]

IGNORE_INDEX = 255
#: The 19 evaluated Cityscapes classes, in trainId order.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
#: The standard colour of each trainId (cityscapesScripts ``labels.py``), in trainId order.
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
#: labelId -> trainId for the 19 evaluated classes (cityscapesScripts ``helpers/labels.py``). Every other
#: labelId (0-6 void, 9 parking, 10 rail track, 14-16 guard rail / bridge / tunnel, 18 polegroup,
#: 29 caravan, 30 trailer, -1 license plate, anything >= 34) maps to 255.
CITYSCAPES_LABEL_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
ACDC_CONDITIONS: tuple[str, ...] = ("fog", "night", "rain", "snow")

_LUT = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
for _label_id, _train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
    _LUT[_label_id] = _train_id
_LUTS: dict[torch.device, torch.Tensor] = {}


def _lut(device: torch.device) -> torch.Tensor:
    if device not in _LUTS:
        _LUTS[device] = _LUT.to(device)
    return _LUTS[device]


def cityscapes_label_to_train_id(mask: torch.Tensor) -> torch.Tensor:
    """Map Cityscapes labelIds to the 19 trainIds (``255`` = ignore) with one table lookup.

    Any integer dtype and shape, on any device; values outside ``0..255`` (the license plate's ``-1``) map
    to ``255``. Returns an int64 tensor of the same shape on the same device.

    Example:
        >>> import torch
        >>> from adaptkit.data.segmentation import cityscapes_label_to_train_id
        >>> cityscapes_label_to_train_id(torch.tensor([7, 8, 26, 33, 0, 9, 29, -1])).tolist()
        [0, 1, 13, 18, 255, 255, 255, 255]
    """
    if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.dtype == torch.bool:
        raise TypeError(f"cityscapes_label_to_train_id expects an integer label tensor, got {mask.dtype}")
    m = mask.long()
    m = m.masked_fill((m < 0) | (m > 255), IGNORE_INDEX)
    return _lut(m.device)[m]


def cityscapes_colorize(mask: torch.Tensor) -> torch.Tensor:
    """Colour a trainId mask ``(..., H, W)`` with :data:`CITYSCAPES_PALETTE`: uint8 ``(..., 3, H, W)``.

    Ignored and unknown values (anything outside ``0..18``) are black.

    Example:
        >>> import torch
        >>> from adaptkit.data.segmentation import cityscapes_colorize
        >>> cityscapes_colorize(torch.tensor([[0, 13, 255]]))[:, 0].tolist()
        [[128, 0, 0], [64, 0, 0], [128, 142, 0]]
    """
    palette = torch.zeros(257, 3, dtype=torch.uint8, device=mask.device)
    palette[: len(CITYSCAPES_PALETTE)] = torch.tensor(CITYSCAPES_PALETTE, dtype=torch.uint8)
    m = mask.long()
    m = m.masked_fill((m < 0) | (m >= len(CITYSCAPES_PALETTE)), 256)
    return palette[m].movedim(-1, -3)


@dataclass(frozen=True)
class SegSample:
    """One image file and its label file.

    Attributes:
        image: The RGB image.
        label: The label PNG.
        train_ids: ``True`` when ``label`` already holds trainIds, ``False`` for labelIds (mapped on read).
        domain: The city (Cityscapes) or condition (ACDC).
    """

    image: Path
    label: Path
    train_ids: bool
    domain: str


def _check_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, str)) or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"size must be None or (H, W) with two positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _check_split(split: str, dataset: str, allowed: Sequence[str]) -> None:
    if split == "test":
        raise ValueError(
            f"{dataset}'s test split has no public labels (its ground truth is held by the evaluation server); "
            "use split='val' to evaluate, or 'train'"
        )
    if split not in allowed:
        raise ValueError(f"{dataset} split must be one of {list(allowed)}, got {split!r}")


def _select(
    requested: Sequence[str] | str | None, present: list[str], kind: str, where: Path, valid: Sequence[str] = ()
) -> list[str]:
    """The requested names (or all present), checked against what is on disk."""
    if requested is None:
        return present
    names = [requested] if isinstance(requested, str) else list(requested)
    if valid:
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ValueError(f"unknown {kind} {unknown}: expected some of {list(valid)}")
    missing = [n for n in names if n not in present]
    if missing:
        raise FileNotFoundError(f"{kind} {missing} not found under {where}; present: {present}")
    return sorted(set(names), key=names.index)


def _pil() -> tuple[Any, Any]:
    """PIL's ``Image`` module and its resampling filters (``Image.Resampling`` since Pillow 9.1)."""
    from PIL import Image

    return Image, getattr(Image, "Resampling", Image)


def read_rgb(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as uint8 ``(3, H, W)``, optionally resized to ``size=(H, W)`` (bilinear, antialiased)."""
    import numpy as np

    image_mod, resampling = _pil()
    with image_mod.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), resampling.BILINEAR)
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_label(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> torch.Tensor:
    """A single-channel label PNG as int64 ``(H, W)``, optionally resized to ``size=(H, W)`` (nearest).

    8-bit grey (``L``), palette (``P``, the indices are read) and 16/32-bit integer PNGs are accepted;
    colour PNGs (e.g. ``*_labelColor.png``) are refused.
    """
    import numpy as np

    image_mod, resampling = _pil()
    with image_mod.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(
                f"{path}: expected a single-channel label PNG (labelIds / labelTrainIds), got PIL mode {im.mode!r}"
            )
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), resampling.NEAREST)
        return torch.from_numpy(np.array(im).astype(np.int64))


class SegmentationFolder(Dataset):
    """Base of the folder datasets: a sorted list of :class:`SegSample` read on demand.

    Items are ``(float image (3, H, W) in [0, 1], int64 mask (H, W))`` with trainIds and ``255`` = ignore;
    :meth:`read` gives the 8-bit image and the mask without the float conversion.
    """

    classes: tuple[str, ...] = CITYSCAPES_CLASSES
    num_classes: int = len(CITYSCAPES_CLASSES)
    ignore_index: int = IGNORE_INDEX

    def __init__(self, samples: list[SegSample], size: Sequence[int] | None = None, limit: int | None = None) -> None:
        self.size = _check_size(size)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
        self.samples: list[SegSample] = samples if limit is None else samples[:limit]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i`` as ``(uint8 image (3, H, W), int64 trainId mask (H, W))``."""
        s = self.samples[i]
        image = read_rgb(s.image, self.size)
        mask = read_label(s.label, self.size)
        if not s.train_ids:
            mask = cityscapes_label_to_train_id(mask)
        if image.shape[1:] != mask.shape:
            raise ValueError(f"{s.image} is {tuple(image.shape[1:])} but its label {s.label} is {tuple(mask.shape)}")
        return image, mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.read(i)
        return image.float() / 255.0, mask

    @property
    def domains(self) -> list[str]:
        """The city / condition of every item, in order."""
        return [s.domain for s in self.samples]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, size={self.size})"


class Cityscapes(SegmentationFolder):
    """Cityscapes fine annotations from the official layout (``leftImg8bit_trainvaltest.zip`` +
    ``gtFine_trainvaltest.zip`` unpacked into ``root``)::

        root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
        root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png   (used when present)
        root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png        (else: mapped to trainIds)

    ``*_labelTrainIds.png`` (written by cityscapesScripts' ``createTrainIdLabelImgs``) are read as they are;
    ``*_labelIds.png`` go through :func:`cityscapes_label_to_train_id`.

    Args:
        root: The folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"val"`` (500 images, the usual TTA / domain-adaptation test set) or ``"train"``. The test
            split's labels are not public.
        size: ``(H, W)`` to resize to (bilinear for the image, nearest for the mask), e.g. ``(512, 1024)``
            as in the OCL / GTA5 -> Cityscapes protocol; ``None`` keeps 1024 x 2048.
        cities: Only these cities (a name or a list, in the given order); ``None`` = all, alphabetically.
        limit: Keep the first ``limit`` items (after sorting and filtering).

    Items are sorted by city, then file name.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> from adaptkit.data.segmentation import Cityscapes
        >>> root = Path(tempfile.mkdtemp())
        >>> for sub, name, mode in [("leftImg8bit", "leftImg8bit", "RGB"), ("gtFine", "gtFine_labelIds", "L")]:
        ...     (root / sub / "val" / "lindau").mkdir(parents=True)
        ...     Image.new(mode, (16, 8), 26).save(root / sub / "val" / "lindau" / f"lindau_000000_000019_{name}.png")
        >>> ds = Cityscapes(root, size=(4, 8))
        >>> image, mask = ds[0]
        >>> len(ds), tuple(image.shape), mask.unique().tolist()  # labelId 26 (car) -> trainId 13
        (1, (3, 4, 8), [13])
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "val",
        size: Sequence[int] | None = None,
        cities: Sequence[str] | str | None = None,
        limit: int | None = None,
    ) -> None:
        _check_split(split, "Cityscapes", ("train", "val"))
        self.root, self.split = Path(root), split
        layout = (
            "expected <root>/leftImg8bit/{split}/{city}/*_leftImg8bit.png and "
            "<root>/gtFine/{split}/{city}/*_gtFine_labelIds.png (or *_gtFine_labelTrainIds.png)"
        )
        img_dir, gt_dir = self.root / "leftImg8bit" / split, self.root / "gtFine" / split
        if not img_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes: {img_dir} not found; {layout}")
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes: {gt_dir} not found (the labels, gtFine_trainvaltest.zip); {layout}")
        present = sorted(p.name for p in img_dir.iterdir() if p.is_dir())
        self.cities = _select(cities, present, "city", img_dir)
        samples = []
        for city in self.cities:
            for image in sorted((img_dir / city).glob("*_leftImg8bit.png")):
                stem = image.name[: -len("_leftImg8bit.png")]
                samples.append(_pair(image, gt_dir / city, stem, "_gtFine", layout, domain=city))
        if not samples:
            raise FileNotFoundError(f"Cityscapes: no *_leftImg8bit.png images under {img_dir}; {layout}")
        super().__init__(samples, size, limit)

    def __repr__(self) -> str:
        return f"Cityscapes(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, size={self.size})"


class ACDC(SegmentationFolder):
    """ACDC (Adverse Conditions Dataset with Correspondences) semantic segmentation, official layout::

        root/rgb_anon/{condition}/{split}/{sequence}/{name}_rgb_anon.png
        root/gt/{condition}/{split}/{sequence}/{name}_gt_labelTrainIds.png   (used when present)
        root/gt/{condition}/{split}/{sequence}/{name}_gt_labelIds.png        (else: mapped to trainIds)

    ``root`` may also be the folder holding the unpacked archives as they come
    (``rgb_anon_trainvaltest/rgb_anon/...`` and ``gt_trainval/gt/...``). The ``*ref`` splits (daytime
    reference images) are not used.

    Args:
        root: The folder holding ``rgb_anon/`` and ``gt/`` (or the two archive folders).
        split: ``"val"`` (406 images) or ``"train"``. The test split's labels are not public.
        size: ``(H, W)`` to resize to (bilinear for the image, nearest for the mask); ``None`` keeps 1080 x 1920.
        conditions: Some of ``"fog"``, ``"night"``, ``"rain"``, ``"snow"`` (a name or a list, in the given
            order); ``None`` = every condition present, alphabetically.
        limit: Keep the first ``limit`` items (after sorting and filtering).

    Items are sorted by condition, then sequence, then file name; :attr:`domains` gives each item's condition.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> from adaptkit.data.segmentation import ACDC
        >>> root = Path(tempfile.mkdtemp())
        >>> for sub, name, mode in [("rgb_anon", "rgb_anon", "RGB"), ("gt", "gt_labelTrainIds", "L")]:
        ...     folder = root / sub / "fog" / "val" / "GOPR0476"
        ...     folder.mkdir(parents=True)
        ...     Image.new(mode, (16, 8), 13).save(folder / f"GOPR0476_frame_000854_{name}.png")
        >>> ds = ACDC(root)
        >>> image, mask = ds[0]
        >>> ds.domains, tuple(image.shape), mask.unique().tolist()  # labelTrainIds are read as they are
        (['fog'], (3, 8, 16), [13])
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "val",
        size: Sequence[int] | None = None,
        conditions: Sequence[str] | str | None = None,
        limit: int | None = None,
    ) -> None:
        _check_split(split, "ACDC", ("train", "val"))
        self.root, self.split = Path(root), split
        layout = (
            "expected <root>/rgb_anon/{condition}/{split}/{sequence}/*_rgb_anon.png and "
            "<root>/gt/{condition}/{split}/{sequence}/*_gt_labelTrainIds.png (or *_gt_labelIds.png); "
            "<root>/rgb_anon_trainvaltest/rgb_anon and <root>/gt_trainval/gt are accepted too"
        )
        rgb = _first_dir(self.root / "rgb_anon", self.root / "rgb_anon_trainvaltest" / "rgb_anon")
        gt = _first_dir(self.root / "gt", self.root / "gt_trainval" / "gt")
        if rgb is None:
            raise FileNotFoundError(f"ACDC: no rgb_anon folder in {self.root}; {layout}")
        if gt is None:
            raise FileNotFoundError(f"ACDC: no gt folder (labels) in {self.root}; {layout}")
        present = [c for c in ACDC_CONDITIONS if (rgb / c / split).is_dir()]
        self.conditions = _select(conditions, present, "condition", rgb, valid=ACDC_CONDITIONS)
        samples = []
        for cond in self.conditions:
            for image in sorted((rgb / cond / split).glob("*/*_rgb_anon.png")):
                stem = image.name[: -len("_rgb_anon.png")]
                label_dir = gt / cond / split / image.parent.name
                samples.append(_pair(image, label_dir, stem, "_gt", layout, domain=cond))
        if not samples:
            raise FileNotFoundError(f"ACDC: no *_rgb_anon.png images for split {split!r} under {rgb}; {layout}")
        super().__init__(samples, size, limit)

    def __repr__(self) -> str:
        return (
            f"ACDC(root={str(self.root)!r}, split={self.split!r}, conditions={self.conditions}, "
            f"n={len(self)}, size={self.size})"
        )


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _pair(image: Path, label_dir: Path, stem: str, infix: str, layout: str, domain: str) -> SegSample:
    """The label of ``image``: ``{stem}{infix}_labelTrainIds.png`` if present, else ``..._labelIds.png``."""
    train_ids = label_dir / f"{stem}{infix}_labelTrainIds.png"
    if train_ids.is_file():
        return SegSample(image, train_ids, True, domain)
    label_ids = label_dir / f"{stem}{infix}_labelIds.png"
    if label_ids.is_file():
        return SegSample(image, label_ids, False, domain)
    raise FileNotFoundError(f"no label for {image}: neither {train_ids} nor {label_ids.name} exists; {layout}")


def stack(dataset: Dataset, n: int | None = None, *, compact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` items (default all) of a segmentation dataset as two tensors, to hold a split in memory.

    With ``compact=True`` (default): uint8 images ``(N, 3, H, W)`` in ``0..255`` and uint8 masks ``(N, H, W)``
    (trainIds, 255 = ignore): 4x / 8x smaller than the items; convert per batch with ``x.float() / 255`` and
    ``y.long()``. With ``compact=False``: float images in ``[0, 1]`` and int64 masks, like the items.
    Every item must have the same size (pass ``size=(H, W)`` to the dataset otherwise).

    Example:
        >>> import torch
        >>> from adaptkit.data.segmentation import stack
        >>> data = [(torch.full((3, 2, 4), 1.0), torch.full((2, 4), 255)) for _ in range(3)]
        >>> x, y = stack(data, n=2)
        >>> tuple(x.shape), x.dtype, x.max().item(), tuple(y.shape), y.dtype
        ((2, 3, 2, 4), torch.uint8, 255, (2, 2, 4), torch.uint8)
    """
    total = len(dataset)  # type: ignore[arg-type]
    count = total if n is None else min(int(n), total)
    if count <= 0:
        raise ValueError(f"nothing to stack: the dataset has {total} items and n={n}")
    read = dataset.read if isinstance(dataset, SegmentationFolder) else None
    images: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    for i in range(count):
        x, y = read(i) if read is not None else dataset[i]
        if compact and x.dtype != torch.uint8:
            x = (x * 255.0).round().clamp_(0, 255).to(torch.uint8)
        elif not compact and x.dtype == torch.uint8:
            x = x.float() / 255.0
        if compact and ((y < 0) | (y > 255)).any():
            raise ValueError(f"item {i}: mask values outside 0..255 do not fit uint8; use compact=False")
        if images is None or masks is None:
            images = torch.empty((count, *x.shape), dtype=x.dtype)
            masks = torch.empty((count, *y.shape), dtype=torch.uint8 if compact else torch.long)
        if x.shape != images.shape[1:] or y.shape != masks.shape[1:]:
            raise ValueError(
                f"item {i} has image {tuple(x.shape)} / mask {tuple(y.shape)} but item 0 has "
                f"{tuple(images.shape[1:])} / {tuple(masks.shape[1:])}: pass size=(H, W) to the dataset"
            )
        images[i] = x
        masks[i] = y
    assert images is not None and masks is not None
    return images, masks
