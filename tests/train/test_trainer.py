"""train_head: frozen mode leaves the model untouched, joint mode trains it, seeds, validation, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_model_unchanged, small_dropout_cnn, snapshot_model

import adaptkit
from adaptkit import NCTTT, NCTTTHead
from adaptkit.train import split_batch, train_head

small_cnn = small_dropout_cnn


def data(n: int = 4, labels: bool = True) -> list:
    g = torch.Generator().manual_seed(3)
    xs = [torch.rand(8, 3, 16, 16, generator=g) for _ in range(n)]
    return [(x, torch.randint(0, 3, (8,), generator=g)) for x in xs] if labels else xs


def test_frozen_mode_leaves_the_model_exactly_as_it_was() -> None:
    model = small_cnn().train()  # a user model in training mode: flags must come back too
    snap = snapshot_model(model)
    head = train_head(model, "2", lambda shapes: NCTTTHead(shapes[0][0]), data(), epochs=2, progress=False)
    assert_model_unchanged(model, snap)
    assert head.binding == {"layers": ["2"], "feature_shapes": [[8, 16, 16]], "input_shape": [3, 16, 16],
                            "model": "Sequential", "joint": False}  # fmt: skip
    assert len(head.history) == 2 and not head.training


def test_loss_decreases_and_validation_is_reported() -> None:
    model = small_cnn().eval()
    head = NCTTT.train_head(model, "2", data(6), epochs=6, val_loader=data(2), lr=1e-2, progress=False)
    losses = [r["train_loss"] for r in head.history]
    assert losses[-1] < losses[0]
    assert all("val_loss" in r and r["val_loss"] > 0 for r in head.history)


def test_seeded_training_is_reproducible() -> None:
    model = small_cnn().eval()
    a = NCTTT.train_head(model, "2", data(), epochs=1, seed=5, progress=False)
    b = NCTTT.train_head(model, "2", data(), epochs=1, seed=5, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_joint_mode_trains_the_model_and_restores_flags() -> None:
    model = small_cnn().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    head = NCTTT.train_head(model, "2", data(), epochs=1, joint=True, val_loader=data(1), progress=False)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert "val_acc" in head.history[0]
    with pytest.raises(ValueError, match="labels"):
        NCTTT.train_head(small_cnn(), "2", data(labels=False), epochs=1, joint=True, progress=False)


def test_max_steps_and_errors() -> None:
    model = small_cnn().eval()
    head = NCTTT.train_head(model, 2, data(), epochs=3, max_steps=1, progress=False)
    assert len(head.history) == 1
    with pytest.raises(ValueError, match="empty"):
        NCTTT.train_head(model, "2", [], epochs=1, progress=False)
    with pytest.raises(ValueError, match="list_layers"):
        NCTTT.train_head(model, "nope", data(), epochs=1, progress=False)
    with adaptkit.Tent(model) as wrapped, pytest.raises(RuntimeError, match="already wrapped"):
        NCTTT.train_head(wrapped, "2", data(), epochs=1, progress=False)


def test_split_batch_forms() -> None:
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert split_batch(x) == (x, None)
    assert split_batch((x, y))[1] is y and split_batch([x])[1] is None
    assert split_batch({"image": x, "label": y})[1] is y
    with pytest.raises(TypeError, match="cannot read"):
        split_batch("nope")
