"""unwrap_model, is_compiled and strip_prefix."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from adaptkit.core import strip_prefix, unwrap_model
from adaptkit.core.unwrap import is_compiled


def test_unwrap_plain_is_identity() -> None:
    net = nn.Linear(2, 2)
    assert unwrap_model(net) is net
    assert not is_compiled(net)


def test_unwrap_dataparallel_nested() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    assert unwrap_model(nn.DataParallel(net)) is net
    assert unwrap_model(nn.DataParallel(nn.DataParallel(net))) is net
    assert not is_compiled(nn.DataParallel(net))


def test_unwrap_module_with_child_named_module_is_not_unwrapped() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    h = Holder()
    assert unwrap_model(h) is h


def test_unwrap_orig_mod_duck_typed() -> None:
    class FakeCompiled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    net = nn.Linear(2, 2)
    fake = FakeCompiled(net)
    assert unwrap_model(fake) is net
    assert unwrap_model(nn.DataParallel(fake)) is net
    assert is_compiled(fake) and is_compiled(nn.DataParallel(fake))


def test_unwrap_torch_compile() -> None:
    if not hasattr(torch, "compile"):
        pytest.skip("no torch.compile")
    net = nn.Linear(2, 2)
    compiled = torch.compile(net)  # lazy: nothing is compiled until called
    assert unwrap_model(compiled) is net
    assert is_compiled(compiled)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("layer1.0.bn1.weight", "layer1.0.bn1.weight"),
        ("module.layer1.weight", "layer1.weight"),
        ("_orig_mod.layer1.weight", "layer1.weight"),
        ("module._orig_mod.module.fc.bias", "fc.bias"),
        ("module", "module"),
        ("encoder.module.weight", "encoder.module.weight"),
        ("modules.x", "modules.x"),
    ],
)
def test_strip_prefix(key: str, expected: str) -> None:
    assert strip_prefix(key) == expected
