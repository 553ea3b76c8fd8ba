"""TTTPlusPlus warns (before wrapping) when a frozen-backbone head meets the released, joint-training lr."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_model_unchanged, small_dropout_cnn, snapshot_model

from adaptkit import TTTPlusPlus


def _head(joint: bool):  # type: ignore[no-untyped-def]
    data = [(torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,))) for _ in range(2)]
    return TTTPlusPlus.train_head(small_dropout_cnn().eval(), "4", data, 1, joint=joint, progress=False, proj_dim=8)


def test_frozen_head_with_the_released_lr_warns() -> None:
    head = _head(joint=False)
    assert head.binding is not None and head.binding["joint"] is False
    model = small_dropout_cnn().eval()
    snap = snapshot_model(model)
    with pytest.raises(UserWarning, match="frozen backbone"), warnings.catch_warnings():
        warnings.simplefilter("error")
        TTTPlusPlus(model, head=head)  # default lr 0.01
    assert_model_unchanged(model, snap)  # no hook, flag or tag left behind
    x = torch.rand(4, 3, 16, 16)
    with TTTPlusPlus(model, head=head, lr=1e-3) as m:  # model left intact: it can be wrapped again
        assert m(x).shape == (4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TTTPlusPlus(model, head=head, lr=1e-4).restore()


def test_joint_head_does_not_warn() -> None:
    head = _head(joint=True)
    assert head.binding is not None and head.binding["joint"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TTTPlusPlus(small_dropout_cnn().eval(), head=head).restore()
