"""Per-epoch training checkpoints of :func:`adaptkit.train.train_head`: everything needed to resume a run where it
stopped and get bitwise the weights an uninterrupted run gives (head, model in joint mode, optimizer, scheduler,
grad scaler, random states, history), in a file ``torch.load(..., weights_only=True)`` reads."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from adaptkit.heads.base import AuxHead

FORMAT = "adaptkit-train-checkpoint-v1"


def _plain(state: Any) -> Any:
    """``state`` with ``Counter`` values (MultiStepLR's milestones) as dicts, so ``weights_only`` loads it."""
    if isinstance(state, Counter):
        return dict(state)
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    return state


def _like(loaded: Any, fresh: Any) -> Any:
    """Undo :func:`_plain` using a freshly built object's state as the template."""
    if isinstance(fresh, Counter) and isinstance(loaded, dict):
        return Counter(loaded)
    if isinstance(fresh, dict) and isinstance(loaded, dict):
        return {k: _like(v, fresh.get(k)) for k, v in loaded.items()}
    return loaded


def signature(head: AuxHead, names: list[str], joint: bool) -> str:
    """What a checkpoint must match to be resumed: head class and config, layers, joint or frozen."""
    return json.dumps(
        {"head": type(head).__name__, "config": head.config, "layers": names, "joint": joint},
        sort_keys=True, default=str,
    )  # fmt: skip


def save(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` atomically (a temporary file next to ``path``, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": FORMAT, **_plain(state)}, tmp)
    tmp.replace(path)


def load(path: str | os.PathLike[str], sig: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (``None`` when there is none); raises if it belongs to another run."""
    path = Path(path)
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"train_head: {os.fspath(path)!r} is not an adaptkit training checkpoint; pass another path")
    if blob.get("signature") != sig:
        raise ValueError(
            f"train_head: the checkpoint {os.fspath(path)!r} was written by another run (head, layers or joint "
            f"mode differ: {blob.get('signature')} vs {sig}); delete it or pass another checkpoint path"
        )
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
    """Load a checkpoint from :func:`capture` into ``objects`` (the same keys) and the random states."""
    for key, obj in objects.items():
        if obj is not None and key in saved:
            obj.load_state_dict(_like(saved[key], obj.state_dict()))
    set_rng_state(saved["rng"], gen)


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
