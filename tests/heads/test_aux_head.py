"""AuxHead: save/load (weights_only), binding checks, feature-map views, batch_stats_mode."""

from __future__ import annotations

import pytest
import torch

from adaptkit import NCTTTHead
from adaptkit.heads import AuxHead, as_feature_map, batch_stats_mode, feature_shape


def test_save_load_round_trip_with_weights_only(tmp_path) -> None:
    torch.manual_seed(0)
    head = NCTTTHead(8, embed_dim=6, hidden=3, mode="flat", spatial=(4, 4), sigma=0.02, alpha=5.0)
    head.bind(["layer1"], [(8, 4, 4)], torch.nn.Conv2d(1, 1, 1), (3, 16, 16))
    head.history = [{"epoch": 1.0, "train_loss": 0.5}]
    with torch.no_grad():
        head.discriminator[2].running_mean.add_(1.5)
    path = tmp_path / "h.pt"
    head.save(path)
    blob = torch.load(path, weights_only=True)  # plain tensors and strings only
    assert blob["format"] == "adaptkit.aux_head/1"
    back = NCTTTHead.load(path)
    assert back.config == head.config and back.binding == head.binding and back.history == head.history
    for (k, v), (k2, v2) in zip(head.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    z = torch.randn(5, 8, 4, 4)
    head.eval(), back.eval()
    assert torch.equal(head.discriminate(head.project(z)), back.discriminate(back.project(z)))
    assert isinstance(AuxHead.load(path), NCTTTHead)  # the generic loader finds the class


def test_load_rejects_other_files_and_classes(tmp_path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an adaptkit head"):
        NCTTTHead.load(tmp_path / "x.pt")

    class OtherHead(AuxHead):
        def __init__(self) -> None:
            super().__init__()
            self._remember()

    OtherHead().save(tmp_path / "o.pt")
    with pytest.raises(ValueError, match="holds a OtherHead"):
        NCTTTHead.load(tmp_path / "o.pt")


def test_binding_checks() -> None:
    head = NCTTTHead(8)
    head.check_layers(["anything"], torch.nn.Linear(1, 1), "x")  # unbound: no opinion
    head.bind(["layer1"], [(8, 4, 4)], torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="trained on layer"):
        head.check_layers(["layer2"], torch.nn.Linear(1, 1), "adaptkit.NCTTT")
    with pytest.raises(ValueError, match="not a Conv2d"):
        head.check_layers(["layer1"], torch.nn.Conv2d(1, 1, 1), "adaptkit.NCTTT")
    head.check_features([torch.zeros(2, 8, 9, 9)], "x")  # pixel heads accept other sizes
    with pytest.raises(ValueError, match="trained on"):
        head.check_features([torch.zeros(2, 7, 4, 4)], "x")


def test_config_must_be_json() -> None:
    class Bad(AuxHead):
        def __init__(self) -> None:
            super().__init__()
            self._remember(obj=object())

    with pytest.raises(TypeError):
        Bad()


def test_feature_views() -> None:
    assert feature_shape(torch.zeros(2, 3, 4, 5)) == (3, 4, 5)
    tokens = torch.arange(2 * 5 * 3.0).view(2, 5, 3)
    fmap = as_feature_map(tokens)
    assert fmap.shape == (2, 3, 5, 1) and torch.equal(fmap[1, 2, 4, 0], tokens[1, 4, 2])
    with pytest.raises(ValueError, match="tap another layer"):
        as_feature_map(torch.zeros(1, 2, 3, 4, 5))


def test_batch_stats_mode_restores_flags_and_writes_nothing() -> None:
    bn = torch.nn.BatchNorm2d(3).eval()
    buf = bn.running_mean.clone()
    with batch_stats_mode(torch.nn.Sequential(bn)):
        y = bn(torch.randn(4, 3, 2, 2) * 3 + 1)
    assert torch.equal(bn.running_mean, buf) and not bn.training and bn.track_running_stats
    assert y.mean().abs() < 1e-5
