"""Norm-layer discovery, stage/layer resolution, list_layers and select_norm_layers."""

from __future__ import annotations

import re
import warnings

import pytest
import torch.nn as nn
import torchvision

from adaptkit import list_layers
from adaptkit.core import resolve_layer, select_norm_layers, stage_names
from adaptkit.core.layers import LayerInfo, format_layers, norm_kind


def _seq_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


class _NamedCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc(self.pool(self.block2(self.block1(self.stem(x)))).flatten(1))


# ---------------------------------------------------------------- norm_kind


def test_norm_kind_torch_layers() -> None:
    assert norm_kind(nn.BatchNorm1d(3)) == "batch"
    assert norm_kind(nn.BatchNorm2d(3)) == "batch"
    assert norm_kind(nn.BatchNorm3d(3)) == "batch"
    assert norm_kind(nn.SyncBatchNorm(3)) == "batch"
    assert norm_kind(nn.BatchNorm2d(3, track_running_stats=False)) == "batch"
    assert norm_kind(nn.GroupNorm(1, 3)) == "group"
    assert norm_kind(nn.LayerNorm(3)) == "layer"
    assert norm_kind(nn.InstanceNorm2d(3)) is None
    assert norm_kind(nn.Conv2d(1, 1, 1)) is None
    assert norm_kind(nn.Identity()) is None


def test_norm_kind_torchvision_frozen() -> None:
    assert norm_kind(torchvision.ops.FrozenBatchNorm2d(3)) == "frozen_batch"


def test_norm_kind_timm() -> None:
    layers = pytest.importorskip("timm.layers")
    assert norm_kind(layers.BatchNormAct2d(4)) == "batch"
    assert norm_kind(layers.LayerNorm2d(4)) == "layer"
    if hasattr(layers, "FrozenBatchNormAct2d"):
        assert norm_kind(layers.FrozenBatchNormAct2d(4)) == "frozen_batch"


# ---------------------------------------------------------------- stages / resolve


def test_stages_torchvision_resnet18() -> None:
    m = torchvision.models.resnet18(num_classes=10)
    stages = stage_names(m)
    assert stages[1:] == ["layer1", "layer2", "layer3", "layer4"]
    assert resolve_layer(m, 1) == "layer1"
    assert resolve_layer(m, 4) == "layer4"
    assert resolve_layer(m, -1) == "layer4"
    assert resolve_layer(m, "layer2") == "layer2"
    assert resolve_layer(m, "layer2.0.conv1") == "layer2.0.conv1"


def test_stages_timm_resnet18_feature_info() -> None:
    timm = pytest.importorskip("timm")
    m = timm.create_model("resnet18", pretrained=False, num_classes=10)
    expected = [d["module"] for d in m.feature_info]
    assert stage_names(m) == expected
    assert resolve_layer(m, 1) == "layer1"
    assert resolve_layer(m, len(expected) - 1) == "layer4"


def test_stages_mobilenet_v3_small() -> None:
    m = torchvision.models.mobilenet_v3_small(num_classes=10)
    stages = stage_names(m)
    assert stages == [f"features.{i}" for i in range(len(m.features))]
    assert resolve_layer(m, 3) == "features.3"
    assert resolve_layer(m, "features.3") == "features.3"


def test_stages_sequential_cnn() -> None:
    m = _seq_cnn()
    # top-level children holding parameters, in forward order, minus the final Linear classifier
    assert stage_names(m) == ["0", "1", "3", "4"]
    assert resolve_layer(m, 0) == "0"
    assert resolve_layer(m, "3") == "3"


def test_stages_named_cnn() -> None:
    m = _NamedCNN()
    assert stage_names(m) == ["stem", "block1", "block2"]
    assert resolve_layer(m, 1) == "block1"
    assert resolve_layer(m, "block1.1") == "block1.1"


def test_stages_torchvision_segmentation_are_the_backbone_stages() -> None:
    """FCN / DeepLabV3 / LR-ASPP: ``layer=i`` is the backbone's stage ``i`` (as on the classification model the
    backbone comes from), never the decoder heads ``classifier`` / ``aux_classifier``."""
    seg = torchvision.models.segmentation
    fcn = seg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=True)
    resnet = ["maxpool", "layer1", "layer2", "layer3", "layer4"]  # torchvision resnet50's stages (test above)
    assert stage_names(fcn) == [f"backbone.{n}" for n in resnet]
    assert resolve_layer(fcn, 1) == "backbone.layer1" and resolve_layer(fcn, -1) == "backbone.layer4"
    lraspp = seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    blocks = len(torchvision.models.mobilenet_v3_large().features)  # the backbone keeps every features block
    assert stage_names(lraspp) == [f"backbone.{i}" for i in range(blocks)]
    assert resolve_layer(lraspp, 1) == "backbone.1"
    rows = {r.name: r.stage for r in list_layers(fcn)}
    assert rows["backbone.layer1"] == 1 and rows["classifier"] is None and rows["aux_classifier"] is None


def test_stages_custom_encoder_decoder_with_backbone() -> None:
    class EncDec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _NamedCNN()
            self.decoder = nn.Conv2d(8, 3, 1)

    m = EncDec()
    assert stage_names(m) == ["backbone.stem", "backbone.block1", "backbone.block2"]
    assert resolve_layer(nn.DataParallel(m), 1) == "backbone.block1"
    m.backbone = nn.Sequential(nn.ReLU(), nn.Identity())  # a backbone without parameters gives no stages
    assert stage_names(m) == ["decoder"]


def test_resolve_strips_module_prefix_and_unwraps_dataparallel() -> None:
    m = torchvision.models.resnet18(num_classes=10)
    assert resolve_layer(m, "module.layer3") == "layer3"
    assert resolve_layer(m, "module._orig_mod.layer3.1.bn2") == "layer3.1.bn2"
    dp = nn.DataParallel(m)
    assert resolve_layer(dp, 1) == "layer1"
    assert resolve_layer(dp, "module.layer2.0") == "layer2.0"
    assert resolve_layer(dp, "layer2.0") == "layer2.0"
    assert stage_names(dp) == stage_names(m)


def test_unknown_name_raises_with_close_matches() -> None:
    m = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError) as ei:
        resolve_layer(m, "layer1.0.bn")
    msg = str(ei.value)
    assert "'layer1.0.bn1'" in msg and "'layer1.0.bn2'" in msg
    assert "list_layers" in msg
    with pytest.raises(ValueError, match="list_layers"):
        resolve_layer(m, "lyr1")


@pytest.mark.parametrize("idx", [5, 99, -6])
def test_out_of_range_int_raises(idx: int) -> None:
    m = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match=re.escape(f"layer={idx}")) as ei:
        resolve_layer(m, idx)
    assert "list_layers" in str(ei.value)


def test_bad_layer_type_raises() -> None:
    m = _seq_cnn()
    with pytest.raises(TypeError):
        resolve_layer(m, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        resolve_layer(m, True)


# ---------------------------------------------------------------- list_layers


def test_list_layers_rows_resnet18() -> None:
    m = torchvision.models.resnet18(num_classes=10)
    rows = list_layers(m)
    assert all(isinstance(r, LayerInfo) for r in rows)
    names = [r.name for r in rows]
    assert names == [n for n, _ in m.named_modules() if n]
    by = {r.name: r for r in rows}
    assert by["bn1"].norm == "batch" and not by["bn1"].frozen and by["bn1"].type == "BatchNorm2d"
    assert by["conv1"].norm is None and by["conv1"].params == 3 * 64 * 7 * 7
    assert by["layer1"].stage == 1 and by["layer4"].stage == 4 and by["conv1"].stage is None
    assert by["fc"].params == 512 * 10 + 10
    norms = list_layers(m, norm_only=True)
    assert len(norms) == 20 and all(r.norm == "batch" for r in norms)
    table = format_layers(norms)
    assert "layer1.0.bn1" in table and "batch" in table


def test_list_layers_frozen_flags() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        torchvision.ops.FrozenBatchNorm2d(4),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.BatchNorm2d(4),
        nn.LayerNorm(4),
    )
    by = {r.name: r for r in list_layers(net, norm_only=True)}
    assert set(by) == {"1", "2", "3", "4"}
    assert by["1"].norm == "frozen_batch" and by["1"].frozen
    assert by["2"].norm == "batch" and by["2"].frozen
    assert by["3"].norm == "batch" and not by["3"].frozen
    assert by["4"].norm == "layer" and not by["4"].frozen
    assert "(frozen)" in str(by["1"])


def test_list_layers_dataparallel_names_unprefixed() -> None:
    m = _NamedCNN()
    rows = list_layers(nn.DataParallel(m))
    assert [r.name for r in rows] == [n for n, _ in m.named_modules() if n]


# ---------------------------------------------------------------- select_norm_layers


def test_select_all_bn() -> None:
    m = torchvision.models.resnet18(num_classes=10)
    sel = select_norm_layers(m, ["batch"])
    assert list(sel) == [n for n, x in m.named_modules() if isinstance(x, nn.BatchNorm2d)]
    assert all(sel[n] is dict(m.named_modules())[n] for n in sel)


def test_select_regex_full_match() -> None:
    m = torchvision.models.resnet18(num_classes=10)
    sel = select_norm_layers(m, ["batch"], include=r"layer1\..*")
    assert list(sel) == ["layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"]
    # a partial match is not enough: "bn1" alone only matches the top-level bn1
    assert list(select_norm_layers(m, ["batch"], include="bn1")) == ["bn1"]
    assert list(select_norm_layers(m, ["batch"], include=r".*bn2")) == [
        n for n in select_norm_layers(m, ["batch"]) if n.endswith("bn2")
    ]


def test_select_list_exact_and_suffix() -> None:
    m = torchvision.models.resnet18(num_classes=10)
    sel = select_norm_layers(m, ["batch"], include=["bn1"])
    # "bn1" as a list entry: the exact name plus every dotted suffix match
    assert list(sel) == [n for n in select_norm_layers(m, ["batch"]) if n == "bn1" or n.endswith(".bn1")]
    sel = select_norm_layers(m, ["batch"], include=["layer2.0.bn1", "module.layer3.1.bn2"])
    assert list(sel) == ["layer2.0.bn1", "layer3.1.bn2"]
    # a suffix must be dotted: "n1" matches nothing and raises
    with pytest.raises(ValueError, match="list_layers"):
        select_norm_layers(m, ["batch"], include=["n1"])


def test_select_exclusions_win() -> None:
    m = torchvision.models.resnet18(num_classes=10)
    sel = select_norm_layers(m, ["batch"], include=r"layer1\..*", exclude=["layer1.0.bn1"])
    assert list(sel) == ["layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"]
    sel = select_norm_layers(m, ["batch"], include=["layer1.0.bn1"], exclude=r"layer1\..*bn2")
    assert list(sel) == ["layer1.0.bn1"]
    with pytest.raises(ValueError, match="include/exclude"):
        select_norm_layers(m, ["batch"], include=["layer1.0.bn1"], exclude=["bn1"])


def test_select_empty_raises() -> None:
    ln_only = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="list_layers") as ei:
        select_norm_layers(ln_only, ["batch"], who="X")
    assert "LayerNorm" in str(ei.value) and str(ei.value).startswith("X")
    with pytest.raises(ValueError):
        select_norm_layers(nn.Sequential(nn.Linear(2, 2)), ["batch", "layer", "group"])
    m = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError):
        select_norm_layers(m, ["batch"], include=r"nothing\..*")


def test_select_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="norm kinds"):
        select_norm_layers(_seq_cnn(), ["instance"])


def test_select_group_and_layer_kinds() -> None:
    m = _NamedCNN()
    assert list(select_norm_layers(m, ["group"])) == ["block2.1"]
    assert list(select_norm_layers(m, ["batch", "group"])) == ["stem.1", "block1.1", "block2.1"]


def test_select_frozen_bn_warns() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), torchvision.ops.FrozenBatchNorm2d(4), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="frozen BatchNorm"):
        sel = select_norm_layers(net, ["batch"])
    assert list(sel) == ["2"]
    only_frozen = nn.Sequential(nn.Conv2d(3, 4, 3), torchvision.ops.FrozenBatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="FrozenBatchNorm2d"):
            select_norm_layers(only_frozen, ["batch"])


def test_select_require_running_stats_warns_and_skips() -> None:
    net = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="no running statistics"):
        sel = select_norm_layers(net, ["batch"], require_running_stats=True)
    assert list(sel) == ["1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(select_norm_layers(net, ["batch"])) == ["0", "1"]


def test_select_unwraps_dataparallel() -> None:
    m = _NamedCNN()
    sel = select_norm_layers(nn.DataParallel(m), ["batch"])
    assert list(sel) == ["stem.1", "block1.1"]
    assert sel["stem.1"] is m.stem[1]


def test_mnasnet_layers_sequence_gives_stages() -> None:
    import torchvision

    from adaptkit.core import resolve_layer

    m = torchvision.models.mnasnet0_5()
    assert resolve_layer(m, 3) == "layers.3"


def test_detection_fpn_backbones_expose_their_body_stages() -> None:
    """torchvision detectors: ``backbone`` is an FPN wrapper whose ``body`` holds the classifier's stages."""
    det = torchvision.models.detection
    rcnn = det.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert stage_names(rcnn) == [f"backbone.body.{n}" for n in ("maxpool", "layer1", "layer2", "layer3", "layer4")]
    assert resolve_layer(rcnn, 1) == "backbone.body.layer1"  # was "backbone.fpn" (2 stages: body, fpn)
    mobile = det.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert stage_names(mobile)[:2] == ["backbone.body.0", "backbone.body.1"]
