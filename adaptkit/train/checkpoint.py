"""Per-epoch training checkpoints of :func:`adaptkit.train.train_head`: everything needed to resume a run where it
stopped and get bitwise the weights an uninterrupted run gives (head, model in joint mode, optimizer, scheduler,
grad scaler, random states, history), in a file ``torch.load(..., weights_only=True)`` reads."""

from __future__ import annotations

import functools
import json
import os
import types
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from adaptkit.core.serialization import check_plain, load_weights_only, save_atomic
from adaptkit.heads.base import AuxHead

FORMAT = "adaptkit-train-checkpoint-v1"
#: what a checkpoint must hold besides the state dicts
_REQUIRED = ("signature", "epoch", "steps", "history", "rng")
#: values :func:`_plain` leaves out of a state (code, rebuilt by whoever builds the object)
_CODE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)


def _plain(state: Any) -> Any:
    """``state`` as plain values ``weights_only`` loads under every supported torch: ``Counter`` values
    (MultiStepLR's milestones) as dicts, and functions and methods left out (old torch's OneCycleLR keeps its
    annealing method in its state; the scheduler factory builds them again, as LambdaLR's state leaves out its
    lambdas)."""
    if isinstance(state, Counter):
        return dict(state)
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items() if not isinstance(v, _CODE)}
    if type(state) in (list, tuple):
        return type(state)(_plain(v) for v in state)
    return state


def _like(loaded: Any, fresh: Any) -> Any:
    """Undo :func:`_plain` using a freshly built object's state as the template."""
    if isinstance(fresh, Counter) and isinstance(loaded, dict):
        return Counter(loaded)
    if isinstance(fresh, dict) and isinstance(loaded, dict):
        return {k: _like(v, fresh.get(k)) for k, v in loaded.items()}
    if isinstance(fresh, list) and isinstance(loaded, list) and len(fresh) == len(loaded):
        return [_like(v, f) for v, f in zip(loaded, fresh)]  # SequentialLR's schedulers
    return loaded


def signature(head: AuxHead, names: list[str], joint: bool) -> str:
    """What a checkpoint must match to be resumed: head class and config, layers, joint or frozen."""
    return json.dumps(
        {"head": type(head).__name__, "config": head.config, "layers": names, "joint": joint},
        sort_keys=True, default=str,
    )  # fmt: skip


def save(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` atomically (a temporary file next to ``path``, then a rename).

    Raises:
        TypeError: a state holds a value ``torch.load(..., weights_only=True)`` could not read (an object); nothing
            is written.
    """
    blob = {"format": FORMAT, **_plain(state)}
    check_plain(blob, "train_head", "a training checkpoint")
    save_atomic(blob, Path(path))


def load(path: str | os.PathLike[str], sig: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (``None`` when there is none), read with ``weights_only=True``.

    Raises:
        ValueError: the file is truncated or damaged, is not a training checkpoint, or belongs to another run.
    """
    path = Path(path)
    if not path.is_file():
        return None
    name = os.fspath(path)
    hint = "delete it (training starts over) or pass another checkpoint path"
    blob = load_weights_only(path, "train_head", "an adaptkit training checkpoint", hint)
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if isinstance(fmt, str) and fmt.startswith("adaptkit.aux_head/"):
        raise ValueError(
            f"train_head: {name!r} is a trained head (head.save), not a training checkpoint; pass a new path as "
            "checkpoint= (it is written every epoch), or load the head with AuxHead.load"
        )
    if fmt != FORMAT:
        raise ValueError(f"train_head: {name!r} is not an adaptkit training checkpoint ({FORMAT}); pass another path")
    if blob.get("signature") != sig:
        raise ValueError(
            f"train_head: the checkpoint {name!r} was written by another run (head, layers or joint "
            f"mode differ: {blob.get('signature')} vs {sig}); delete it or pass another checkpoint path"
        )
    missing = [k for k in _REQUIRED if k not in blob]
    if missing or not isinstance(blob["rng"], dict) or not isinstance(blob["history"], list):
        raise ValueError(f"train_head: the checkpoint {name!r} is damaged (missing {missing or 'rng'}); {hint}")
    blob["_path"] = name  # for the errors of resume
    return blob


def capture(
    sig: str,
    epoch: int,
    steps: int,
    history: list[dict[str, float]],
    objects: dict[str, Any],
    gen: torch.Generator | None,
) -> dict[str, Any]:
    """A checkpoint after ``epoch`` epochs: the state dicts of ``objects`` (head, model, optimizer, scheduler,
    scaler; ``None`` entries are left out) and the random states."""
    state: dict[str, Any] = {"signature": sig, "epoch": epoch, "steps": steps, "history": history}
    state.update({k: obj.state_dict() for k, obj in objects.items() if obj is not None})
    state["rng"] = rng_state(gen)
    return state


def resume(saved: dict[str, Any], objects: dict[str, Any], gen: torch.Generator | None) -> None:
    """Load a checkpoint from :func:`capture` into ``objects`` (the same keys) and the random states.

    Raises:
        ValueError: a state does not fit its object (another model in joint mode, another optimizer, ...).
    """
    for key, obj in objects.items():
        if obj is not None and key in saved:
            try:
                obj.load_state_dict(_like(saved[key], obj.state_dict()))
            except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
                raise _misfit(saved, key, e) from e
    try:
        set_rng_state(saved["rng"], gen)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise _misfit(saved, "random states", e) from e


def _misfit(saved: dict[str, Any], what: str, e: BaseException) -> ValueError:
    detail = " ".join(str(e).split())
    return ValueError(
        f"train_head: the checkpoint {saved.get('_path', '')!r} does not fit this run's {what} ({detail[:300]}); it "
        "was written for another model, optimizer or scheduler: delete it or pass another checkpoint path"
    )


def rng_state(gen: torch.Generator | None) -> dict[str, Any]:
    """The torch CPU / CUDA random states and the auxiliary task's generator state."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    if gen is not None:
        out["gen"] = gen.get_state()
    return out


def set_rng_state(state: dict[str, Any], gen: torch.Generator | None) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if gen is not None and "gen" in state:
        gen.set_state(state["gen"])
