"""Replace the statistics a BatchNorm layer normalises with, per forward, through owned hooks.

A forward pre-hook measures the layer input's channel moments, asks a policy for the ``(mean, var)`` to
use, and swaps them in for the running buffers for this one call; a forward hook registered with
``always_call=True`` puts the original buffers back, even when the forward raises. The layer runs its
own kernel in inference form, so the running statistics are never written and nothing is patched on the
class. Each call is self-contained: a user ``model.eval()`` / ``model.train()`` cannot make a layer reuse
an earlier batch's statistics (the robusta ``BayesianBatchNorm`` bug).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from adaptkit.core.hooks import HookManager
from adaptkit.functional.moments import Moments, batch_moments

#: ``policy(name, module, moments) -> (mean, var)`` to normalise with, or ``None`` for the source statistics.
StatsPolicy = Callable[[str, nn.Module, Moments], Optional[tuple[torch.Tensor, torch.Tensor]]]


class BNStatsOverride:
    """Per-forward statistic replacement for a set of BatchNorm layers.

    Args:
        layers: ``{qualified_name: bn_module}``; every module must track running statistics.
        policy: see :data:`StatsPolicy`.
        hooks: the owning :class:`HookManager` (its ``remove_all`` detaches everything).
        active: when given, the hooks do nothing (not even measure the input) while ``active()`` is false.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.core import HookManager
        >>> from adaptkit.core.bn import BNStatsOverride
        >>> bn, hooks = nn.BatchNorm1d(1).eval(), HookManager()
        >>> _ = BNStatsOverride({"bn": bn}, lambda n, m, mom: (mom.mean, mom.var), hooks)
        >>> [round(v, 4) for v in bn(torch.tensor([[1.0], [3.0]])).flatten().tolist()]  # mean 2, var 2
        [-0.7071, 0.7071]
        >>> bn.running_mean.tolist(), hooks.remove_all()
        ([0.0], None)
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        policy: StatsPolicy,
        hooks: HookManager,
        active: Callable[[], bool] | None = None,
    ) -> None:
        self.policy = policy
        self.active = active
        self._lock = threading.Lock()
        self._stash: dict[int, tuple[nn.Module, Any, Any, bool]] = {}
        for name, module in layers.items():
            hooks.forward_pre(module, self._make_pre(name))
            hooks.forward(module, self._post, always_call=True)
        # torch runs always_call hooks on an Exception only: a KeyboardInterrupt (any BaseException) between the
        # pre-hook and the layer's end leaves the swapped statistics in; removing the hooks puts them back
        hooks.on_remove(self.unstash_all)

    def _make_pre(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if self.active is not None and not self.active():
                return
            x = inputs[0]
            buf = module._buffers
            # at least float32: half-precision buffers would lose the variance of large activations
            mom = batch_moments(x.detach(), dtype=torch.promote_types(buf["running_mean"].dtype, torch.float32))
            stats = self.policy(name, module, mom)
            if stats is None:
                return
            mean, var = stats
            with self._lock:
                if id(module) in self._stash:  # left swapped by an interrupted forward: put the source back first
                    self._unstash(id(module))
                self._stash[id(module)] = (module, buf["running_mean"], buf["running_var"], module.training)
            buf["running_mean"] = mean.to(buf["running_mean"].dtype)
            buf["running_var"] = var.to(buf["running_var"].dtype)
            module.training = False  # inference form: use (and never write) the swapped-in statistics

        return pre

    def _post(self, module: nn.Module, inputs: Any, output: Any) -> None:
        with self._lock:
            self._unstash(id(module))

    def _unstash(self, key: int) -> None:
        saved = self._stash.pop(key, None)
        if saved is not None:
            module, mean, var, training = saved
            module._buffers["running_mean"], module._buffers["running_var"], module.training = mean, var, training

    def unstash_all(self) -> None:
        """Put back every buffer still swapped (after a forward interrupted by a ``BaseException``)."""
        with self._lock:
            for key in list(self._stash):
                self._unstash(key)
