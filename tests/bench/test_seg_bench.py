"""The segmentation benchmark (issue 6, point 4): Fashion-MNIST-style scenes, mIoU rows checked against an
independent IoU computation, the ``--task segmentation`` command end to end, and the report's figures."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import calibrate_bn

from adaptkit.bench.runner import BenchConfig, build_domains, run_bench
from adaptkit.cli import main
from adaptkit.data.scenes import SCENE_CLASSES, make_scenes


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "adaptkit-cache"))


def _has_matplotlib() -> bool:
    """Plots are optional (the ``[bench]`` extra): without matplotlib the report is written without them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class TinySeg(nn.Module):
    """Conv-BN-ReLU encoder at half resolution, 1x1 classifier, bilinear upsampling; torchvision-style dict."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.head(self.body(x))
        return OrderedDict(out=F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))


def _squares(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Items that are solid 10x10 squares (value 200) in a 28x28 frame, class k for item k."""
    items = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    items[:, :, 9:19, 9:19] = 200
    return items, torch.arange(n)


# ---------------------------------------------------------------------------------------------- scenes
def test_scene_labels_are_the_item_silhouettes() -> None:
    items, labels = _squares()
    x, m = make_scenes(items, labels, n=20, size=48, items=(1, 1), scale=(1.0, 1.0), seed=3)
    assert x.shape == (20, 3, 48, 48) and x.dtype == torch.uint8 and m.dtype == torch.int64
    for i in range(20):
        ys, xs = torch.nonzero(m[i] > 0, as_tuple=True)
        assert len(ys) == 100, "one 10x10 square per scene"
        assert int(ys.max() - ys.min()) == 9 and int(xs.max() - xs.min()) == 9
        assert len(m[i][m[i] > 0].unique()) == 1 and 1 <= int(m[i].max()) <= 6  # label = class + 1
        inside = x[i][:, m[i] > 0].float()
        assert torch.allclose(inside, inside[:, :1].expand_as(inside), atol=1.0)  # one tint, solid item
        assert (inside[:, 0] >= 0.45 * 200 - 1).all()  # tint in [0.45, 1] of the item value


def test_scenes_are_seeded_and_later_items_occlude() -> None:
    items, labels = _squares()
    a = make_scenes(items, labels, n=8, size=40, seed=1)
    b = make_scenes(items, labels, n=8, size=40, seed=1)
    c = make_scenes(items, labels, n=8, size=40, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    # on a tiny canvas with many items, the squares overlap: each labelled pixel still holds a single class
    _, m = make_scenes(items, labels, n=10, size=30, items=(3, 3), scale=(1.0, 1.0), seed=0)
    assert ((m >= 0) & (m <= 6)).all()
    assert all(int((m[i] > 0).sum()) <= 300 for i in range(10))
    assert any(int((m[i] > 0).sum()) < 300 for i in range(10)), "expected some occlusion"
    assert SCENE_CLASSES[0] == "background" and len(SCENE_CLASSES) == 11


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": torch.zeros(4, 3, 28, 28)}, r"\(M, 1, h, w\)"),
        ({"labels": torch.arange(3)}, "matching"),
        ({"items": (0, 2)}, "1 <= lo <= hi"),
        ({"size": 30, "scale": (1.0, 1.5)}, "do not fit"),
    ],
)
def test_scene_errors(kwargs: dict, match: str) -> None:
    args = {"images": torch.zeros(4, 1, 28, 28), "labels": torch.arange(4), "n": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_scenes(**args)


# ---------------------------------------------------------------------------------------------- bench
def _iou_reference(pred: torch.Tensor, target: torch.Tensor, classes: int) -> tuple[float, list[float]]:
    """mIoU over classes present in target or prediction, by explicit pixel sets (no confusion matrix)."""
    p, t = pred.reshape(-1).tolist(), target.reshape(-1).tolist()
    ious = []
    for c in range(classes):
        ps = {i for i, v in enumerate(p) if v == c}
        ts = {i for i, v in enumerate(t) if v == c}
        ious.append(math.nan if not ps | ts else len(ps & ts) / len(ps | ts))
    valid = [v for v in ious if not math.isnan(v)]
    return 100.0 * sum(valid) / len(valid), ious


def _model(classes: int) -> nn.Module:
    torch.manual_seed(0)
    return calibrate_bn(TinySeg(classes), (torch.rand(8, 3, 40, 40) for _ in range(2)))


def test_segmentation_rows_match_an_independent_miou() -> None:
    cfg = BenchConfig(
        task="segmentation", dataset="synthetic_scenes", corruptions=["gaussian_noise", "contrast"],
        methods=["source", "bn_adapt:N=0"], batch_size=16, n_samples=None, progress=False, shift_score=False,
    )  # fmt: skip
    assert cfg.model == "fmnist_lraspp" and cfg.source_epochs == 6  # segmentation defaults
    classes = 5  # synthetic items have 4 classes, + background
    model = _model(classes)
    res = run_bench(cfg, write=False, model=model)
    domains, clean = build_domains(cfg)
    assert clean is not None
    by = {(r["method"], r["domain"]): r for r in res.rows}
    for d in [*domains, clean]:
        with torch.no_grad():
            pred = model(d.x.float() / 255.0)["out"].argmax(1)
        miou, ious = _iou_reference(pred, d.y, classes)
        row = by[("source", d.name)]
        assert row["miou"] == pytest.approx(miou, abs=1e-6)
        assert row["error"] == pytest.approx(100.0 - miou, abs=1e-6)
        assert row["pixel_accuracy"] == pytest.approx(100.0 * float((pred == d.y).float().mean()), abs=1e-6)
        assert row["iou"] == pytest.approx([100.0 * v for v in ious], abs=1e-3, nan_ok=True)
        assert row["n"] == len(d.y)
        # the report keeps the source predictions of the first images of every domain
        assert torch.equal(res.examples[d.name]["source"], pred[:4].to(torch.uint8))
        assert torch.equal(res.examples[d.name]["target"], d.y[:4])
    # BN adaptation on the shifted sets is a different model state: its rows differ from the source's
    assert any(by[("bn_adapt(N=0)", d.name)]["miou"] != by[("source", d.name)]["miou"] for d in domains)


def test_segmentation_bench_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seg"
    rc = main([
        "bench", "--task", "segmentation", "--dataset", "synthetic_scenes", "--corruptions", "gaussian_noise",
        "--batch-size", "16", "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mIoU (%) per shift" in printed and "| gaussian_noise-5 |" in printed
    plots = ("corruption_bars.png", "segmentation_examples.png") if _has_matplotlib() else ()
    for name in ("report.md", "results.json", "results.csv", *plots):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["task"] == "segmentation" and data["config"]["model"] == "fmnist_lraspp"
    assert {r["method"] for r in data["rows"]} == {
        "source",
        "bn_adapt(N=0)",
        "tent(lr=0.0001)",
        "ocl(lr=0.0005,bn_prior=0.01)",
    }
    for r in data["rows"]:
        assert 0.0 <= r["miou"] <= 100.0 and 0.0 <= r["pixel_accuracy"] <= 100.0
        assert len(r["iou"]) == 5 and "accuracy" not in r
    summ = {s["method"]: s for s in data["summary"]}
    assert summ["source"]["gain_over_source"] == 0.0 and "mce" not in summ["source"]
    # the synthetic source model is trained with calibrated BN statistics: adapting them to noise pays off
    assert summ["bn_adapt(N=0)"]["mean_miou"] > summ["source"]["mean_miou"] + 1.0
    assert set(summ["ocl(lr=0.0005,bn_prior=0.01)"]) >= {"mean_miou", "clean_miou"}
    md = (out / "report.md").read_text()
    assert "mCE" not in md
    assert plots or "(plots skipped: install adaptkit[bench] for matplotlib)" in md


def test_segmentation_config_errors() -> None:
    with pytest.raises(ValueError, match="task"):
        BenchConfig(task="detection")
    with pytest.raises(ValueError, match="dirichlet"):
        BenchConfig(task="segmentation", dirichlet=0.1)


def _png_tree(root: Path, rel_dir: str, stem_img: str, stem_lab: str, label: int, n: int = 2) -> None:
    from PIL import Image

    for i in range(n):
        for rel, stem, mode, value in (
            (rel_dir[0], stem_img, "RGB", (40 * i, 90, 200)),
            (rel_dir[1], stem_lab, "L", label),
        ):
            d = root / rel
            d.mkdir(parents=True, exist_ok=True)
            Image.new(mode, (24, 16), value).save(d / f"s{i}_000000_{stem}.png")


def test_bench_on_cityscapes_and_acdc_layouts(tmp_path: Path) -> None:
    """Real shifted sets as domains, no synthetic corruption: Cityscapes val (one domain, labelIds mapped),
    ACDC val (one domain per condition present), resized; mIoU against the hand-computed value."""
    city, acdc = tmp_path / "cityscapes", tmp_path / "acdc"
    _png_tree(city, ("leftImg8bit/val/lindau", "gtFine/val/lindau"), "leftImg8bit", "gtFine_labelIds", 26)  # car
    for cond in ("fog", "night"):
        _png_tree(
            acdc, (f"rgb_anon/{cond}/val/GOPR0475", f"gt/{cond}/val/GOPR0475"), "rgb_anon", "gt_labelTrainIds", 0
        )

    class Constant(nn.Module):
        """Predicts trainId 13 (car) everywhere: 19 classes, like a Cityscapes model."""

        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = torch.zeros(x.shape[0], 19, *x.shape[-2:]) + 0 * self.bn(x).sum()
            logits[:, 13] = 1.0
            return {"out": logits}

    for dataset, root, names, expect in [("cityscapes", city, {"cityscapes-val"}, 100.0),
                                          ("acdc", acdc, {"acdc-fog", "acdc-night"}, 0.0)]:  # fmt: skip
        cfg = BenchConfig(
            task="segmentation", dataset=dataset, data_root=str(root), image_size=(8, 12), methods=["source"],
            batch_size=2, progress=False, shift_score=False,
        )  # fmt: skip
        res = run_bench(cfg, write=False, model=Constant().eval())
        assert {r["domain"] for r in res.rows} == names
        for r in res.rows:  # car everywhere vs car labels (IoU 1) / road labels (car IoU 0, road IoU 0)
            assert r["miou"] == pytest.approx(expect) and r["n"] == 2
            assert res.examples[r["domain"]]["target"].shape == (2, 8, 12)
    with pytest.raises(ValueError, match="task='segmentation'"):
        build_domains(BenchConfig(dataset="acdc", data_root=str(acdc)))


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--dirichlet", "0.1"], "dirichlet"),
        (["--dataset", "cityscapes"], "--data-root"),
        (["--dataset", "cityscapes", "--data-root", "/nonexistent/cityscapes"], "leftImg8bit"),
    ],
)
def test_segmentation_cli_errors_are_messages(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Settings or data the user can fix end with a one-line error and exit code 2, not a traceback."""
    assert main(["bench", "--task", "segmentation", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptkit bench: error:") and match in err and "Traceback" not in err
