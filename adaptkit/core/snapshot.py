"""Snapshot of exactly what a wrapper touches; restored in place with ``copy_``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

_NORM_ATTRS = ("momentum", "eps", "track_running_stats")


class Snapshot:
    """Cloned tensors, the ``requires_grad`` map, every ``training`` flag and norm hyper-parameters.

    Tensors are cloned once at wrap time (only those the method may change) and written back with ``copy_``
    under ``no_grad``, so parameter identity survives for optimizers, hooks and compiled graphs.

    Args:
        model: the unwrapped model.
        tensors: names (``model.named_parameters()`` / ``named_buffers()`` keys) of the tensors to clone.
        norm_modules: names of modules whose momentum / eps / track_running_stats to record.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.core import Snapshot
        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> snap = Snapshot(net, ["0.weight"], ["0"])
        >>> with torch.no_grad():
        ...     _ = net[0].weight.add_(1.0)
        >>> snap.restore_tensors(); net[0].weight.tolist()
        [1.0, 1.0]
    """

    def __init__(self, model: nn.Module, tensors: Iterable[str] = (), norm_modules: Iterable[str] = ()) -> None:
        self.model = model
        live = self._live(model)
        self.tensors: dict[str, torch.Tensor] = {}
        for name in tensors:
            if name not in live:
                raise KeyError(f"Snapshot: {name!r} is not a parameter or buffer of the model")
            self.tensors[name] = live[name].detach().clone()
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.training = {n: m.training for n, m in model.named_modules()}
        modules = dict(model.named_modules())
        self.norm_attrs = {
            n: {a: getattr(modules[n], a) for a in _NORM_ATTRS if hasattr(modules[n], a)} for n in norm_modules
        }

    @staticmethod
    def _live(model: nn.Module) -> dict[str, torch.Tensor]:
        live = dict(model.named_parameters())
        live.update({n: b for n, b in model.named_buffers() if b is not None})
        return live

    def restore_tensors(self) -> None:
        """Copy the saved values back into the live tensors (bitwise, identity kept)."""
        live = self._live(self.model)
        with torch.no_grad():
            for name, saved in self.tensors.items():
                t = live[name]
                if t.shape != saved.shape:
                    raise RuntimeError(
                        f"Snapshot: {name!r} changed shape from {tuple(saved.shape)} to {tuple(t.shape)}"
                    )
                t.copy_(saved)

    def restore_flags(self) -> None:
        """Restore ``requires_grad``, every ``training`` flag and the recorded norm hyper-parameters."""
        for n, p in self.model.named_parameters():
            if n in self.requires_grad:
                p.requires_grad_(self.requires_grad[n])
        modules = dict(self.model.named_modules())
        for n, flag in self.training.items():
            if n in modules:
                modules[n].training = flag
        for n, attrs in self.norm_attrs.items():
            for a, v in attrs.items():
                setattr(modules[n], a, v)

    def restore(self) -> None:
        """Restore tensors and flags."""
        self.restore_tensors()
        self.restore_flags()

    def nbytes(self) -> int:
        """Memory held by the cloned tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
