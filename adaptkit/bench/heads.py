"""Auxiliary heads for the test-time-training methods in a benchmark: trained once on the source training
data with the method's ``train_head`` helper, cached on disk, or loaded from a file.

Method-spec keys starting with ``head.`` configure the head, e.g.
``ncttt:lr=1e-3,layer=1,head.embed_dim=64,head.epochs=2``: ``head.path`` loads a saved head; ``head.epochs``,
``head.lr``, ``head.joint``, ``head.batch_size`` and ``head.n`` (training images) drive the helper; every other
``head.<key>`` goes to the head's constructor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import adaptkit
from adaptkit.bench.spec import MethodSpec
from adaptkit.data.datasets import as_unit_float
from adaptkit.heads.base import AuxHead

_TRAIN_KEYS = {"epochs": 3, "lr": None, "joint": False, "batch_size": 128, "n": None}


def needs_head(name: str) -> bool:
    """Whether the registered method ``name`` takes a trained auxiliary head."""
    cls = adaptkit.get_method(name)
    return isinstance(getattr(cls, "head_class", None), type) and hasattr(cls, "train_head")


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method_kwargs, head_settings)`` from a spec's overrides (``head.`` prefix stripped)."""
    method = {k: v for k, v in overrides.items() if not k.startswith("head.")}
    head = {k[5:]: v for k, v in overrides.items() if k.startswith("head.")}
    return method, head


def prepare_head(
    model: nn.Module,
    spec: MethodSpec,
    train_data: tuple[torch.Tensor, torch.Tensor] | None,
    cache: Path | None,
    model_label: str,
    seed: int,
    device: str,
    progress: bool,
) -> tuple[AuxHead, nn.Module]:
    """Load or train (and cache) the head of one method spec; returns ``(head, model)`` where ``model`` is the
    given one, or with ``head.joint=true`` a jointly trained copy (the source model itself is never changed)."""
    cls = adaptkit.get_method(spec.name)
    method_kw, head_kw = split_overrides(spec.overrides)
    if "path" in head_kw:
        return cls.head_class.load(str(head_kw["path"])), model  # type: ignore[attr-defined]
    layer = method_kw.get("layer", 1)
    train = {k: head_kw.pop(k, default) for k, default in _TRAIN_KEYS.items()}
    if train_data is None:
        raise ValueError(
            f"bench: {spec.name} needs a trained head: pass train_data=(images, labels) to run_bench, a dataset "
            f"with a training split (fashion_mnist, synthetic), or head.path=<file saved with head.save()>"
        )
    key = json.dumps(
        {"model": model_label, "method": spec.name, "layer": layer, "head": head_kw, "train": train, "seed": seed,
         "n_train": len(train_data[1]), "version": adaptkit.__version__},
        sort_keys=True, default=str,
    )  # fmt: skip
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    path = None if cache is None else cache / f"{spec.name}_{digest}.pt"
    joint = bool(train["joint"])
    if path is not None and path.is_file() and not joint:
        return cls.head_class.load(path), model  # type: ignore[attr-defined]
    x, y = train_data
    if train["n"] is not None:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(y), generator=g)[: int(train["n"])]
        x, y = x[idx], y[idx]
    bs = int(train["batch_size"])
    g = torch.Generator().manual_seed(seed)

    class _Loader:
        def __len__(self) -> int:
            return (len(y) + bs - 1) // bs

        def __iter__(self):  # type: ignore[no-untyped-def]
            order = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), bs):
                j = order[i : i + bs]
                yield as_unit_float(x[j]), y[j]

    used = copy.deepcopy(model) if joint else model
    head = cls.train_head(
        used, layer, _Loader(), int(train["epochs"]), joint=joint, lr=train["lr"], seed=seed, device=device,
        progress=progress, **head_kw,
    )  # fmt: skip
    if path is not None and not joint:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # concurrent runs: own temp file
        head.save(tmp)
        tmp.replace(path)
    return head, used.eval()
