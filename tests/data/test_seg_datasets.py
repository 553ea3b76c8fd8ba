"""Cityscapes / ACDC folder loaders on tiny PNG trees written here in the official layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptkit.data.segmentation import (
    ACDC,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    Cityscapes,
    cityscapes_colorize,
    cityscapes_label_to_train_id,
    stack,
)

# (name, labelId, trainId, color) transcribed from cityscapesScripts/helpers/labels.py (mcordts/cityscapesScripts).
OFFICIAL = [
    ("unlabeled", 0, 255, (0, 0, 0)), ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)), ("out of roi", 3, 255, (0, 0, 0)), ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)), ("ground", 6, 255, (81, 0, 81)), ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)), ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)), ("building", 11, 2, (70, 70, 70)), ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)), ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)), ("tunnel", 16, 255, (150, 120, 90)), ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)), ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)), ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)), ("sky", 23, 10, (70, 130, 180)), ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)), ("car", 26, 13, (0, 0, 142)), ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)), ("caravan", 29, 255, (0, 0, 90)), ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)), ("motorcycle", 32, 17, (0, 0, 230)), ("bicycle", 33, 18, (119, 11, 32)),
    ("license plate", -1, -1, (0, 0, 142)),
]  # fmt: skip
H, W = 8, 16


def _official_train_id(label_id: int) -> int:
    """Plain-python reference: the table above, with -1 and unknown ids ignored (255)."""
    for _, lid, tid, _ in OFFICIAL:
        if lid == label_id and lid >= 0:
            return tid
    return 255


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _label_ids(seed: int) -> np.ndarray:
    """Every labelId 0..34 and 255 (unknown ids) appear, shifted by ``seed``."""
    values = (np.arange(H * W) + seed) % 36
    values[values == 35] = 255
    return values.astype(np.uint8).reshape(H, W)


def _cityscapes(root: Path, split: str = "val") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """2 cities x 2 images, written out of order; returns {stem: (rgb, labelIds)}."""
    out = {}
    for k, (city, seq, frame) in enumerate(
        [("bochum", "000000", "000313"), ("aachen", "000001", "000019"), ("bochum", "000000", "000019"),
         ("aachen", "000000", "000019")]
    ):  # fmt: skip
        stem = f"{city}_{seq}_{frame}"
        rgb, lab = _rgb(k), _label_ids(k)
        _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
        _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
        _png(root / "gtFine" / split / city / f"{stem}_gtFine_color.png", _rgb(99))  # ignored by the loader
        out[stem] = (rgb, lab)
    return out


# ---------------------------------------------------------------------------------------------- label table


def test_label_to_train_id_matches_official_table() -> None:
    ids = torch.tensor([lid for _, lid, _, _ in OFFICIAL] + [34, 45, 200, 255, 256, -7])
    expected = [_official_train_id(int(i)) for i in ids]
    out = cityscapes_label_to_train_id(ids)
    assert out.dtype == torch.int64 and out.tolist() == expected
    # the hand-checked anchors of the brief
    lut = {int(i): int(t) for i, t in zip(ids, out)}
    assert (lut[7], lut[26], lut[33], lut[8], lut[11], lut[24]) == (0, 13, 18, 1, 2, 11)
    assert all(lut[i] == 255 for i in [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, -1])
    assert sorted(t for t in lut.values() if t != 255) == list(range(19))  # each trainId from exactly one labelId


def test_label_to_train_id_dtypes_and_shapes() -> None:
    lab = torch.from_numpy(_label_ids(1))
    ref = torch.tensor([[_official_train_id(int(v)) for v in row] for row in lab])
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        out = cityscapes_label_to_train_id(lab.to(dtype)[None])
        assert out.shape == (1, H, W) and out.dtype == torch.int64 and torch.equal(out[0], ref)
    with pytest.raises(TypeError, match="integer"):
        cityscapes_label_to_train_id(lab.float())


@pytest.mark.gpu
def test_label_to_train_id_on_cuda() -> None:
    lab = torch.arange(-1, 40).cuda()
    out = cityscapes_label_to_train_id(lab)
    assert out.is_cuda and out.cpu().tolist() == [_official_train_id(i) for i in range(-1, 40)]


def test_classes_and_palette_match_official() -> None:
    by_train_id = {tid: (name, color) for name, _, tid, color in OFFICIAL if 0 <= tid < 255}
    assert tuple(by_train_id[t][0] for t in range(19)) == CITYSCAPES_CLASSES
    assert tuple(by_train_id[t][1] for t in range(19)) == CITYSCAPES_PALETTE
    rgb = cityscapes_colorize(torch.tensor([[[0, 13], [18, 255]]]))
    assert rgb.shape == (1, 3, 2, 2) and rgb.dtype == torch.uint8
    assert rgb[0, :, 0, 1].tolist() == [0, 0, 142] and rgb[0, :, 1, 0].tolist() == [119, 11, 32]
    assert rgb[0, :, 1, 1].tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------- Cityscapes


def test_cityscapes_items_order_and_values(tmp_path: Path) -> None:
    files = _cityscapes(tmp_path)
    ds = Cityscapes(tmp_path)
    stems = ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000019", "bochum_000000_000313"]
    assert [s.image.name for s in ds.samples] == [f"{s}_leftImg8bit.png" for s in stems]
    assert ds.domains == ["aachen", "aachen", "bochum", "bochum"] and ds.cities == ["aachen", "bochum"]
    assert len(ds) == 4 and ds.num_classes == 19 and ds.ignore_index == 255
    for i, stem in enumerate(stems):
        image, mask = ds[i]
        rgb, lab = files[stem]
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        assert mask.shape == (H, W) and mask.dtype == torch.int64
        assert torch.equal(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)
        assert mask.tolist() == [[_official_train_id(int(v)) for v in row] for row in lab]
    raw, mask = ds.read(0)
    assert raw.dtype == torch.uint8 and torch.equal(raw, torch.from_numpy(files[stems[0]][0]).permute(2, 0, 1))


def test_cityscapes_filters_and_limit(tmp_path: Path) -> None:
    _cityscapes(tmp_path)
    assert Cityscapes(tmp_path, cities="bochum").domains == ["bochum", "bochum"]
    assert Cityscapes(tmp_path, cities=["bochum", "aachen"]).domains == ["bochum", "bochum", "aachen", "aachen"]
    limited = Cityscapes(tmp_path, limit=3)
    assert len(limited) == 3 and limited.samples == Cityscapes(tmp_path).samples[:3]
    assert len(Cityscapes(tmp_path, limit=0)) == 0
    with pytest.raises(ValueError, match="limit"):
        Cityscapes(tmp_path, limit=-1)
    with pytest.raises(FileNotFoundError, match=r"city \['munich'\] not found.*\['aachen', 'bochum'\]"):
        Cityscapes(tmp_path, cities=["munich"])


def test_cityscapes_resize_nearest_for_masks(tmp_path: Path) -> None:
    files = _cityscapes(tmp_path)
    stem = "aachen_000000_000019"
    full = Cityscapes(tmp_path)[0][1]
    down_image, down = Cityscapes(tmp_path, size=(4, 8))[0]
    assert down_image.shape == (3, 4, 8) and down.shape == (4, 8) and down.dtype == torch.int64
    assert set(down.unique().tolist()) <= set(full.unique().tolist())  # nearest: no new label values
    up_image, up = Cityscapes(tmp_path, size=(2 * H, 2 * W))[0]
    assert up_image.shape == (3, 2 * H, 2 * W)
    assert torch.equal(up, full.repeat_interleave(2, 0).repeat_interleave(2, 1))  # x2 nearest = pixel repeat
    # the image is interpolated (bilinear), not repeated: new intensities appear between neighbours
    rgb = torch.from_numpy(files[stem][0]).permute(2, 0, 1).float() / 255.0
    assert not torch.equal(up_image, rgb.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert float(up_image.min()) >= 0.0 and float(up_image.max()) <= 1.0
    with pytest.raises(ValueError, match="size"):
        Cityscapes(tmp_path, size=512)  # type: ignore[arg-type]


def test_cityscapes_label_train_ids_used_as_is(tmp_path: Path) -> None:
    _cityscapes(tmp_path)
    stem = "aachen_000000_000019"
    _png(tmp_path / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_labelTrainIds.png", np.full((H, W), 7, np.uint8))
    ds = Cityscapes(tmp_path)
    assert ds.samples[0].train_ids and not ds.samples[1].train_ids
    assert ds[0][1].unique().tolist() == [7]  # as labelIds 7 would also give 0 (road): read as-is


def test_cityscapes_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit.*expected <root>/leftImg8bit/\{split\}/\{city\}"):
        Cityscapes(tmp_path / "nowhere")
    _cityscapes(tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        Cityscapes(tmp_path, split="train")
    with pytest.raises(ValueError, match="no public labels"):
        Cityscapes(tmp_path, split="test")
    with pytest.raises(ValueError, match="split must be one of"):
        Cityscapes(tmp_path, split="training")
    _png(tmp_path / "leftImg8bit" / "val" / "aachen" / "aachen_000009_000019_leftImg8bit.png", _rgb(5))
    with pytest.raises(FileNotFoundError, match=r"no label for .*aachen_000009_000019_leftImg8bit\.png"):
        Cityscapes(tmp_path)


def test_cityscapes_refuses_colour_labels(tmp_path: Path) -> None:
    _cityscapes(tmp_path)
    stem = "aachen_000000_000019"
    _png(tmp_path / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_labelTrainIds.png", _rgb(3))
    with pytest.raises(ValueError, match="single-channel"):
        Cityscapes(tmp_path)[0]


# ---------------------------------------------------------------------------------------------- ACDC


def _acdc(root: Path, rgb_dir: str = "rgb_anon", gt_dir: str = "gt") -> dict[str, np.ndarray]:
    """fog / night / snow (no rain), val: trainId labels, one labelIds-only image, plus ignored extras."""
    labels = {}
    items = [("snow", "GP010122", "GP010122_frame_000010"), ("fog", "GOPR0478", "GOPR0478_frame_000005"),
             ("fog", "GOPR0476", "GOPR0476_frame_000854"), ("night", "GOPR0351", "GOPR0351_frame_000159")]  # fmt: skip
    for k, (cond, seq, name) in enumerate(items):
        _png(root / rgb_dir / cond / "val" / seq / f"{name}_rgb_anon.png", _rgb(k))
        train_ids = np.where(np.arange(H * W) % 20 == 19, 255, (np.arange(H * W) + k) % 19).reshape(H, W)
        _png(root / gt_dir / cond / "val" / seq / f"{name}_gt_labelTrainIds.png", train_ids.astype(np.uint8))
        _png(root / gt_dir / cond / "val" / seq / f"{name}_gt_labelColor.png", _rgb(50))
        labels[name] = train_ids
    # a labelIds-only image (mapped through the Cityscapes table), and reference images that are not used
    _png(root / rgb_dir / "night" / "val" / "GOPR0351" / "GOPR0351_frame_000200_rgb_anon.png", _rgb(7))
    _png(root / gt_dir / "night" / "val" / "GOPR0351" / "GOPR0351_frame_000200_gt_labelIds.png", _label_ids(3))
    labels["GOPR0351_frame_000200"] = np.vectorize(_official_train_id)(_label_ids(3))
    _png(root / rgb_dir / "fog" / "valref" / "GOPR0476" / "GOPR0476_frame_000854_rgb_ref_anon.png", _rgb(8))
    return labels


def test_acdc_items_and_train_ids_as_is(tmp_path: Path) -> None:
    labels = _acdc(tmp_path)
    ds = ACDC(tmp_path)
    assert ds.conditions == ["fog", "night", "snow"]
    names = ["GOPR0476_frame_000854", "GOPR0478_frame_000005", "GOPR0351_frame_000159", "GOPR0351_frame_000200",
             "GP010122_frame_000010"]  # fmt: skip
    assert [s.image.name for s in ds.samples] == [f"{n}_rgb_anon.png" for n in names]
    assert ds.domains == ["fog", "fog", "night", "night", "snow"]
    assert [s.train_ids for s in ds.samples] == [True, True, True, False, True]
    for i, name in enumerate(names):
        image, mask = ds[i]
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        assert mask.dtype == torch.int64 and mask.tolist() == labels[name].tolist()
    first = ds[0][1]  # trainId 7 (traffic sign) stays 7, not re-mapped as a labelId (7 = road -> 0)
    assert int((first == 7).sum()) == int((labels[names[0]] == 7).sum()) > 0


def test_acdc_filters_limit_resize(tmp_path: Path) -> None:
    _acdc(tmp_path)
    assert ACDC(tmp_path, conditions=["snow", "fog"]).domains == ["snow", "fog", "fog"]
    assert ACDC(tmp_path, conditions="night").domains == ["night", "night"]
    assert len(ACDC(tmp_path, limit=2)) == 2 and ACDC(tmp_path, limit=2).domains == ["fog", "fog"]
    image, mask = ACDC(tmp_path, size=(4, 8))[1]
    assert image.shape == (3, 4, 8) and mask.shape == (4, 8)
    assert set(mask.unique().tolist()) <= set(ACDC(tmp_path)[1][1].unique().tolist())
    with pytest.raises(FileNotFoundError, match=r"condition \['rain'\] not found.*\['fog', 'night', 'snow'\]"):
        ACDC(tmp_path, conditions=["rain"])
    with pytest.raises(ValueError, match="unknown condition"):
        ACDC(tmp_path, conditions=["sunny"])


def test_acdc_archive_layout_and_errors(tmp_path: Path) -> None:
    _acdc(tmp_path, "rgb_anon_trainvaltest/rgb_anon", "gt_trainval/gt")
    assert len(ACDC(tmp_path)) == 5
    with pytest.raises(ValueError, match="no public labels"):
        ACDC(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match=r"no rgb_anon folder.*rgb_anon/\{condition\}/\{split\}"):
        ACDC(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no \*_rgb_anon\.png images for split 'train'"):
        ACDC(tmp_path, split="train")
    _png(tmp_path / "rgb_anon_trainvaltest/rgb_anon/fog/val/GOPR0476/GOPR0476_frame_000999_rgb_anon.png", _rgb(1))
    with pytest.raises(FileNotFoundError, match=r"no label for .*GOPR0476_frame_000999_rgb_anon\.png"):
        ACDC(tmp_path)


# ---------------------------------------------------------------------------------------------- stack


def test_stack_compact_and_float(tmp_path: Path) -> None:
    _cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, size=(4, 8))
    x, y = stack(ds)
    assert x.shape == (4, 3, 4, 8) and x.dtype == torch.uint8 and y.shape == (4, 4, 8) and y.dtype == torch.uint8
    xf, yf = stack(ds, n=2, compact=False)
    assert xf.dtype == torch.float32 and yf.dtype == torch.int64 and len(xf) == 2
    for i in range(2):
        image, mask = ds[i]
        assert torch.equal(xf[i], image) and torch.equal(yf[i], mask)
        assert torch.equal(x[i].float() / 255.0, image) and torch.equal(y[i].long(), mask)
    # a plain list of float items is quantised to 8 bits; sizes must agree
    items = [(torch.full((3, 2, 2), 0.5), torch.zeros(2, 2, dtype=torch.long))] * 2
    assert stack(items)[0].unique().tolist() == [128]
    with pytest.raises(ValueError, match="pass size"):
        stack([*items, (torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long))])
    with pytest.raises(ValueError, match="nothing to stack"):
        stack(Cityscapes(tmp_path, limit=0))
