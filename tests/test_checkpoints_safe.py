"""Checkpoint files load with ``torch.load(weights_only=True)`` and pickle no code; bad files give clear errors.

Covered: head files (``AuxHead.save`` / ``load``), adaptation states (``adaptation_state_dict`` saved by the user
with ``torch.save``, for every registered method) and ``train_head`` checkpoints. The pickle of each file is
scanned for the globals it names: only those torch 2.1's ``weights_only`` unpickler allows (tensor rebuild
functions, storage types, ``OrderedDict``) may appear, so the files load under every supported torch.
"""

from __future__ import annotations

import functools
import pickletools
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from helpers import small_dropout_cnn

import adaptkit
from adaptkit import NCTTTHead, RotationHead
from adaptkit.core.serialization import check_plain
from adaptkit.heads import AuxHead
from adaptkit.train import checkpoint as ckpt
from adaptkit.train import train_head

#: globals a saved file may name: those torch 2.1's weights_only unpickler knows (no Counter, device, set, ...)
ALLOWED_GLOBALS = re.compile(
    r"collections\.OrderedDict|torch\._utils\._rebuild_(tensor_v2|parameter)|torch\.Size|torch\.\w+Storage"
)
SIZE = 16


def pickle_globals(path: Path) -> set[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in the ``data.pkl`` of a ``torch.save`` zip file."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    found: set[str] = set()
    strings: list[Any] = []  # values pushed, for STACK_GLOBAL (protocol 4); memo for BINGET
    memo: dict[int, Any] = {}
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(arg))
    return found


def assert_safe(path: Path) -> Any:
    """The file names no code and loads with weights_only=True; returns what it holds."""
    refs = pickle_globals(path)
    assert refs, "the scan found no global at all: it reads the wrong pickle"
    bad = sorted(r for r in refs if not ALLOWED_GLOBALS.fullmatch(r))
    assert not bad, f"{path.name} pickles references to {bad}"
    return torch.load(path, weights_only=True)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def batch(i: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(100 + i)) * 1.5 + 0.3


AUX = {"ncttt": adaptkit.NCTTT, "clust3": adaptkit.ClusT3, "ttt": adaptkit.TTT, "ttt_pp": adaptkit.TTTPlusPlus}
KWARGS: dict[str, dict[str, Any]] = {
    "bn_adapt": {"N": 16},
    "tent": {"lr": 1e-3},
    "ncttt": {"lr": 1e-3, "steps": 2},
    "clust3": {"lr": 1e-3, "steps": 2},
    "ttt": {"lr": 1e-3, "steps": 2, "momentum": 0.9},
    "ttt_pp": {"lr": 1e-3},
    # EATA's Fisher and anchor weights go into the adaptation state: give it source data so they exist
    "eata": {"fisher_data": [torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))]},
}


@functools.cache
def trained_head(method: str) -> AuxHead:
    """A head of ``method`` trained for a few steps on ``conv2`` of :class:`TinyCNN` (cached)."""
    return AUX[method].train_head(TinyCNN().eval(), "conv2", [batch(0), batch(1)], epochs=1, progress=False)


def wrap(method: str, model: nn.Module) -> adaptkit.TTAMethod:
    cls = adaptkit.get_method(method)
    if method in AUX:
        return cls(model, layer="conv2", head=trained_head(method), **KWARGS[method])
    return cls(model, **KWARGS.get(method, {}))


def data(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def nc_head(shapes: list[tuple[int, ...]]) -> NCTTTHead:
    return NCTTTHead(shapes[0][0], embed_dim=16)


def truncate(path: Path, to: Path) -> Path:
    raw = path.read_bytes()
    to.write_bytes(raw[: len(raw) // 2])
    return to


class Opaque:
    """A class a file could pickle by reference (code): weights_only must refuse it."""


# ---------------------------------------------------------------------------------------------- head files
@pytest.mark.parametrize("method", sorted(AUX))
def test_trained_head_file_is_plain_and_loads_with_weights_only(tmp_path: Path, method: str) -> None:
    head = trained_head(method)
    path = tmp_path / "head.pt"
    head.save(path)
    blob = assert_safe(path)
    assert set(blob) == {"format", "meta", "state_dict"} and isinstance(blob["meta"], str)
    assert all(type(v) is torch.Tensor for v in blob["state_dict"].values())
    back = AuxHead.load(path)  # the class comes from its recorded name
    assert type(back) is type(head) and back.binding == head.binding and back.history == head.history
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), back.state_dict().values()))
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic save left no temporary file


def test_head_file_errors_are_clear(tmp_path: Path) -> None:
    head = NCTTTHead(8, embed_dim=6)
    head.bind(["conv2"], [(8, 4, 4)], TinyCNN())
    good = tmp_path / "head.pt"
    head.save(good)

    def fails(path: Path, match: str, cls: type[AuxHead] = NCTTTHead) -> None:
        with pytest.raises(ValueError, match=match) as info:
            cls.load(path)
        assert str(path) in str(info.value)

    fails(truncate(good, tmp_path / "half.pt"), "truncated or corrupt")
    (tmp_path / "empty.pt").write_bytes(b"")
    fails(tmp_path / "empty.pt", "file is empty")
    (tmp_path / "text.pt").write_text("weights: 1, 2, 3")
    fails(tmp_path / "text.pt", "not a file written by torch.save")
    torch.save(torch.randn(4), tmp_path / "tensor.pt")
    fails(tmp_path / "tensor.pt", r"not an adaptkit head file .* but a Tensor; pass a file written by head.save")
    torch.save(TinyCNN().state_dict(), tmp_path / "sd.pt")
    fails(tmp_path / "sd.pt", "not an adaptkit head file")
    torch.save({"format": "adaptkit.aux_head/1", "cls": Opaque}, tmp_path / "code.pt")
    fails(tmp_path / "code.pt", r"pickled Python object \(.*Opaque\).*weights_only=True refuses")
    RotationHead(8).save(tmp_path / "rot.pt")
    fails(tmp_path / "rot.pt", "holds a RotationHead; load it with adaptkit.heads.RotationHead.load")

    blob = torch.load(good, weights_only=True)
    blob["state_dict"]["projector.weight"] = torch.zeros(3, 3)
    torch.save(blob, tmp_path / "shapes.pt")
    fails(tmp_path / "shapes.pt", r"weights .* do not fit the NCTTTHead .*size mismatch for projector.weight")
    fails(tmp_path / "shapes.pt", "do not fit", AuxHead)
    blob = torch.load(good, weights_only=True)
    blob["meta"] = blob["meta"][:20]
    torch.save(blob, tmp_path / "meta.pt")
    fails(tmp_path / "meta.pt", "damaged adaptkit head file")
    torch.save({**blob, "format": "adaptkit.aux_head/9"}, tmp_path / "newer.pt")
    fails(tmp_path / "newer.pt", "format 'adaptkit.aux_head/9'")
    with pytest.raises(FileNotFoundError):
        NCTTTHead.load(tmp_path / "missing.pt")

    # a head of another layer loads, and wrapping a model at another layer says so
    loaded = NCTTTHead.load(good)
    with pytest.raises(ValueError, match="trained on layer"):
        adaptkit.NCTTT(TinyCNN(), layer="conv1", head=loaded)


def test_head_save_refuses_objects_and_writes_nothing(tmp_path: Path) -> None:
    class Carrying(AuxHead):
        def __init__(self) -> None:
            super().__init__()
            self._remember()
            self.w = nn.Parameter(torch.zeros(2))

        def get_extra_state(self) -> Any:
            return {"helper": Opaque()}

        def set_extra_state(self, state: Any) -> None:
            pass

    with pytest.raises(TypeError, match=r"cannot save .*\['helper'\] \(a Opaque\) in a head file"):
        Carrying().save(tmp_path / "c.pt")
    head = NCTTTHead(8)
    head.history = [{"loss": Opaque()}]  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="must be JSON"):
        head.save(tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- adaptation state
@pytest.mark.parametrize("method", adaptkit.list_methods())
def test_adaptation_state_file_is_plain_and_loads_with_weights_only(tmp_path: Path, method: str) -> None:
    wa = wrap(method, TinyCNN().eval())
    wa(batch(2))
    wa(batch(3))
    path = tmp_path / "state.pt"
    torch.save(wa.adaptation_state_dict(), path)  # the way a user checkpoints an adaptation run
    state = assert_safe(path)
    assert state["_adaptkit.method"] == method

    wb = wrap(method, TinyCNN().eval())
    wb(batch(5))  # other adaptation first: loading overwrites it
    wb.load_adaptation_state_dict(state)
    assert torch.equal(wa(batch(4)), wb(batch(4)))


def test_adaptation_state_of_an_aux_method_holds_the_adapted_head(tmp_path: Path) -> None:
    wa = wrap("ncttt", TinyCNN().eval())
    wa.adapt_head = True  # the head's weights join the state
    wa(batch(2))
    torch.save(wa.adaptation_state_dict(), tmp_path / "s.pt")
    state = assert_safe(tmp_path / "s.pt")
    assert any(k.startswith("_adaptkit.state.head.") for k in state)
    assert isinstance(state["_adaptkit.optimizer"], dict)


# ---------------------------------------------------------------------------------------------- train_head checkpoints
@pytest.mark.parametrize("joint", [False, True])
def test_train_checkpoint_is_plain_and_loads_with_weights_only(tmp_path: Path, joint: bool) -> None:
    path = tmp_path / "run.pt"
    sched = functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1, 3], gamma=0.5)  # a Counter
    head = train_head(small_dropout_cnn(), "4", nc_head, data(), 2, joint=joint, scheduler=sched, checkpoint=path,
                      progress=False)  # fmt: skip
    blob = assert_safe(path)
    assert blob["epoch"] == 2 and blob["history"] == head.history
    assert {"head", "optimizer", "scheduler", "rng"} <= set(blob) and ("model" in blob) == joint
    assert blob["scheduler"]["milestones"] == {1: 1, 3: 1}
    # and it resumes (a finished run: nothing left to train, the head comes back as saved)
    again = train_head(small_dropout_cnn(), "4", nc_head, data(), 2, joint=joint, scheduler=sched, checkpoint=path,
                       progress=False)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))


def test_train_checkpoint_leaves_code_out_and_refuses_objects(tmp_path: Path) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1.0, total_steps=10)
    state = sched.state_dict()
    state["anneal_func"] = sched.get_last_lr  # torch 2.1's OneCycleLR keeps a bound method in its state
    path = tmp_path / "c.pt"
    rng = {"torch": torch.get_rng_state()}
    ckpt.save(path, {"signature": "s", "scheduler": state, "milestones": Counter({3: 1}), "rng": rng})
    blob = assert_safe(path)
    assert "anneal_func" not in blob["scheduler"] and blob["milestones"] == {3: 1}
    with pytest.raises(TypeError, match=r"cannot save \['scheduler'\]\['best'\] \(a Opaque\)"):
        ckpt.save(tmp_path / "d.pt", {"scheduler": {"best": Opaque()}})
    with pytest.raises(TypeError, match=r"\['x'\] \(a Counter\)"):  # torch 2.1's weights_only refuses Counter
        check_plain({"x": Counter()}, "train_head", "a training checkpoint")
    assert not (tmp_path / "d.pt").exists()


def test_train_checkpoint_errors_are_clear(tmp_path: Path) -> None:
    good = tmp_path / "run.pt"
    train_head(small_dropout_cnn(), "4", nc_head, data(), 1, joint=True, checkpoint=good, progress=False)

    def fails(path: Path, match: str, model: nn.Module | None = None, layer: str = "4") -> None:
        with pytest.raises(ValueError, match=match) as info:
            train_head(model or small_dropout_cnn(), layer, nc_head, data(), 2, joint=True, checkpoint=path,
                       progress=False)  # fmt: skip
        assert str(path) in str(info.value)

    fails(truncate(good, tmp_path / "half.pt"), "truncated or corrupt.*delete it .* or pass another checkpoint")
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    fails(tmp_path / "tensor.pt", "not an adaptkit training checkpoint")
    torch.save({"format": ckpt.FORMAT, "opaque": Opaque}, tmp_path / "code.pt")
    fails(tmp_path / "code.pt", r"pickled Python object \(.*Opaque\)")
    NCTTTHead(8).save(tmp_path / "head.pt")
    fails(tmp_path / "head.pt", "is a trained head")
    fails(good, "another run", layer="1")  # another layer
    other = nn.Sequential(*list(small_dropout_cnn())[:-1], nn.Linear(8, 7))  # same layer "4", other classifier
    fails(good, r"the checkpoint .* does not fit this run's model .*size mismatch", model=other)
    blob = torch.load(good, weights_only=True)
    del blob["rng"]
    torch.save(blob, tmp_path / "damaged.pt")
    fails(tmp_path / "damaged.pt", "damaged")
    with pytest.raises(ValueError, match="train_head checkpoint"):  # a checkpoint is not a head file
        NCTTTHead.load(good)
