"""Method registry: names, lookup, adapt-by-name and registration rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import adaptkit
from adaptkit import registry
from adaptkit.core import TTAMethod


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


@pytest.fixture
def clean_registry():  # type: ignore[no-untyped-def]
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_list_methods_sorted_and_contains_core_methods() -> None:
    names = adaptkit.list_methods()
    assert names == sorted(names)
    assert {"bn_adapt", "tent"} <= set(names)
    assert all(n == n.lower() and " " not in n for n in names)


def test_get_method() -> None:
    assert adaptkit.get_method("tent") is adaptkit.Tent
    assert adaptkit.get_method("BN-Adapt") is adaptkit.BNAdapt
    assert adaptkit.get_method("bn_adapt") is adaptkit.BNAdapt


def test_every_registered_class_is_a_ttamethod_with_its_name() -> None:
    for name in adaptkit.list_methods():
        cls = adaptkit.get_method(name)
        assert issubclass(cls, TTAMethod)
        assert cls.name == name


def test_adapt_by_name_with_overrides() -> None:
    model = _net().eval()
    m = adaptkit.adapt(model, "bn_adapt", N=4, accumulate=True)
    assert isinstance(m, adaptkit.BNAdapt)
    assert m.N == 4.0 and m.accumulate is True
    assert m.model is model
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 2)
    assert m.restore() is model
    t = adaptkit.adapt(model, "tent", lr=5e-4, steps=2)
    assert isinstance(t, adaptkit.Tent) and t.lr == 5e-4 and t.steps == 2
    t.restore()


def test_adapt_bad_override_raises_typeerror_and_leaves_model() -> None:
    model = _net()
    with pytest.raises(TypeError):
        adaptkit.adapt(model, "bn_adapt", not_an_arg=1)
    adaptkit.BNAdapt(model).restore()  # not left tagged


def test_unknown_name_suggests() -> None:
    with pytest.raises(ValueError) as ei:
        adaptkit.adapt(_net(), "tnet")
    msg = str(ei.value)
    assert "'tnet'" in msg and "Did you mean 'tent'" in msg
    assert "bn_adapt" in msg  # lists what is available
    with pytest.raises(ValueError, match="bn_adapt"):
        adaptkit.get_method("bn_adaptt")


def test_class_names_and_spellings_resolve() -> None:
    for spelling in ("bn_adapt", "BNAdapt", "bnadapt", "bn-adapt", "BN_ADAPT"):
        assert adaptkit.get_method(spelling) is adaptkit.BNAdapt
    assert adaptkit.get_method("Tent") is adaptkit.Tent


@pytest.mark.usefixtures("clean_registry")
def test_duplicate_name_raises_same_class_ok() -> None:
    class Dummy(TTAMethod):
        name = "dummy_registry_test"

    assert adaptkit.register_method(Dummy) is Dummy
    assert adaptkit.register_method(Dummy) is Dummy  # same class twice: fine
    assert "dummy_registry_test" in adaptkit.list_methods()

    class Other(TTAMethod):
        name = "dummy_registry_test"

    with pytest.raises(ValueError, match="already registered"):
        adaptkit.register_method(Other)
    assert adaptkit.get_method("dummy_registry_test") is Dummy

    class Clash(TTAMethod):
        name = "tent"

    with pytest.raises(ValueError, match="already registered"):
        adaptkit.register_method(Clash)
    assert adaptkit.get_method("tent") is adaptkit.Tent


@pytest.mark.usefixtures("clean_registry")
@pytest.mark.parametrize("bad", ["", "Tent2", "my-method", "has space"])
def test_bad_names_rejected(bad: str) -> None:
    cls = type("Bad", (TTAMethod,), {"name": bad})
    with pytest.raises(ValueError, match="lower_snake_case"):
        adaptkit.register_method(cls)
    assert bad not in adaptkit.list_methods()
