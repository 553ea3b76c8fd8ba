"""Owned hooks that are always removed, and a per-device feature tap."""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle


class HookManager:
    """Registers hooks and owns their handles; :meth:`remove_all` is idempotent.

    Example:
        >>> import torch.nn as nn
        >>> from adaptkit.core import HookManager
        >>> layer, hooks = nn.Linear(2, 2), HookManager()
        >>> hooks.forward(layer, lambda m, i, o: None)
        >>> len(layer._forward_hooks), len(hooks)
        (1, 1)
        >>> hooks.remove_all(); hooks.remove_all()
        >>> len(layer._forward_hooks)
        0
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._cleanups: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._handles)

    def forward(self, module: nn.Module, fn: Callable[..., Any], *, always_call: bool = False) -> None:
        """Register a forward hook ``fn(module, inputs, output)``."""
        self._handles.append(module.register_forward_hook(fn, always_call=always_call))

    def forward_pre(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        """Register a forward pre-hook ``fn(module, inputs)``."""
        self._handles.append(module.register_forward_pre_hook(fn))

    def on_remove(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` in :meth:`remove_all`, after the hooks are gone (undo what a hook may have left half done)."""
        self._cleanups.append(fn)

    def remove_all(self) -> None:
        """Remove every hook registered through this manager, then run the :meth:`on_remove` callbacks (safe to
        call repeatedly; each callback runs once)."""
        while self._handles:
            self._handles.pop().remove()
        while self._cleanups:
            self._cleanups.pop()()


class FeatureTap:
    """Captures a module's output, keyed by device, and drops it when read.

    DataParallel runs hooks once per replica thread, so captures are keyed by device under a lock.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.core import FeatureTap, HookManager
        >>> net, hooks = nn.Sequential(nn.Linear(3, 2), nn.ReLU()), HookManager()
        >>> tap = FeatureTap(net[0], hooks)
        >>> _ = net(torch.zeros(4, 3))
        >>> tap.pop().shape
        torch.Size([4, 2])
        >>> tap.pop() is None
        True
    """

    def __init__(self, module: nn.Module, hooks: HookManager) -> None:
        self._lock = threading.Lock()
        self._store: dict[torch.device, torch.Tensor] = {}
        hooks.forward(module, self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor):
            with self._lock:
                self._store[out.device] = out

    def pop(self, device: torch.device | None = None) -> torch.Tensor | None:
        """Return (and forget) the capture for ``device``; all devices concatenated when ``None``."""
        with self._lock:
            if device is not None:
                return self._store.pop(torch.device(device), None)
            if not self._store:
                return None
            vals = list(self._store.values())
            self._store.clear()
        return vals[0] if len(vals) == 1 else torch.cat([v.to(vals[0].device) for v in vals])

    def clear(self) -> None:
        """Drop every capture."""
        with self._lock:
            self._store.clear()
