"""Model copies and parameter averaging shared by the teacher-student methods (CoTTA, RoTTA, OCL, ...).

* :func:`model_copy` - a private copy of a (configured) model with no hooks, no ``.grad`` and no gradients;
* :func:`ema_update_` - mean-teacher update ``t <- m * t + (1 - m) * s`` of the parameters, in place;
* :func:`stochastic_restore_` - each element goes back to its source value with probability ``p``;
* :class:`SeededGenerators` - one seeded ``torch.Generator`` per device, with state for checkpoints.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.alerts import AdaptationWarning

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def model_copy(model: nn.Module, tag: str | None = None) -> nn.Module:
    """A deep copy of ``model`` for a teacher or an anchor: every hook dropped, no ``.grad``, no gradients.

    ``copy.deepcopy`` keeps the hook *functions* of the original (functions are not copied), so a copy made
    while adaptkit's hooks are installed would run them against the original's state; they are removed here.
    Training flags and norm hyper-parameters are those of ``model`` at the time of the call (call it after
    configuring the student). ``tag``: an attribute name removed from the copy (adaptkit's wrapped-model tag).

    Example:
        >>> import torch.nn as nn
        >>> from adaptkit.core.teacher import model_copy
        >>> net = nn.Linear(2, 2)
        >>> _ = net.register_forward_hook(lambda m, i, o: o * 0)
        >>> twin = model_copy(net)
        >>> len(twin._forward_hooks), twin.weight.requires_grad, twin.weight is net.weight
        (0, False, False)
    """
    # each hook dict is replaced by an empty one *through the memo*, so deepcopy never visits the hooks: a hook
    # that is a bound method would otherwise deep-copy its owner (a wrapper, and whatever it references)
    memo: dict[int, Any] = {}
    for m in model.modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if isinstance(d, dict):
                memo[id(d)] = type(d)()
    twin = copy.deepcopy(model, memo)
    if tag is not None:
        for m in twin.modules():
            if tag in vars(m):
                delattr(m, tag)
    for p in twin.parameters():
        p.grad = None
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], momentum: float) -> None:
    """Exponential moving average in place: ``t <- momentum * t + (1 - momentum) * s`` for each pair.

    CoTTA's teacher uses ``momentum = 0.999``; RoTTA's ``1 - nu`` with ``nu = 0.001``.

    Example:
        >>> import torch
        >>> from adaptkit.core.teacher import ema_update_
        >>> t, s = torch.zeros(2), torch.ones(2)
        >>> ema_update_([t], [s], 0.9); t.tolist()
        [0.10000000149011612, 0.10000000149011612]
    """
    targets, sources = list(target), list(source)
    if len(targets) != len(sources):
        raise ValueError(f"ema_update_: {len(targets)} target tensors but {len(sources)} source tensors")
    for t, s in zip(targets, sources):
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)


@torch.no_grad()
def stochastic_restore_(
    params: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
    prob: float,
    generators: SeededGenerators,
) -> None:
    """Reset each element of each tensor to its source value with probability ``prob`` (in place).

    CoTTA's stochastic restoration (``p = 0.01`` CIFAR, ``0.001`` ImageNet); the masks come from ``generators``
    so a reset run replays them.

    Example:
        >>> import torch
        >>> from adaptkit.core.teacher import SeededGenerators, stochastic_restore_
        >>> p, src = torch.ones(4), torch.zeros(4)
        >>> stochastic_restore_([p], [src], 1.0, SeededGenerators(0)); p.tolist()
        [0.0, 0.0, 0.0, 0.0]
    """
    if len(params) != len(sources):
        raise ValueError(f"stochastic_restore_: {len(params)} tensors but {len(sources)} source tensors")
    if prob <= 0.0:
        return
    for p, src in zip(params, sources):
        mask = torch.rand(p.shape, generator=generators.get(p.device), device=p.device) < prob
        p.copy_(torch.where(mask, src.to(p.dtype), p))


class SeededGenerators:
    """One ``torch.Generator`` per device, seeded with ``seed`` on first use; :meth:`clear` re-seeds lazily.

    Example:
        >>> import torch
        >>> from adaptkit.core.teacher import SeededGenerators
        >>> g = SeededGenerators(0)
        >>> a = torch.rand(2, generator=g.get(torch.device("cpu")))
        >>> g.clear(); bool(torch.equal(a, torch.rand(2, generator=g.get(torch.device("cpu")))))
        True
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._gens: dict[str, torch.Generator] = {}

    def get(self, device: torch.device | str) -> torch.Generator:
        """The generator of ``device`` (created and seeded on first use)."""
        key = str(torch.device(device))
        g = self._gens.get(key)
        if g is None:
            g = torch.Generator(device=key)
            g.manual_seed(self.seed)
            self._gens[key] = g
        return g

    def clear(self) -> None:
        """Forget every generator (the next :meth:`get` re-seeds: a reset run replays the same draws)."""
        self._gens.clear()

    def state(self, prefix: str = "rng.") -> dict[str, Any]:
        """``{prefix + device: generator state}`` for checkpoints."""
        return {f"{prefix}{k}": g.get_state() for k, g in self._gens.items()}

    def load_state(self, state: dict[str, Any], prefix: str = "rng.") -> None:
        """Inverse of :meth:`state` (entries without ``prefix`` are ignored).

        All or nothing: every generator is rebuilt and loaded before any is replaced, so a state that does not fit
        leaves the current generators as they were. The state of a device this machine cannot use (a checkpoint
        saved on ``cuda:0`` and loaded on a CPU-only machine) is skipped with an
        :class:`~adaptkit.AdaptationWarning`: that device's generator is re-seeded on first use.
        """
        gens: dict[str, torch.Generator] = {}
        for k, v in state.items():
            if not k.startswith(prefix):
                continue
            key = str(torch.device(k[len(prefix) :]))
            try:
                g = torch.Generator(device=key)
            except RuntimeError:  # no such device here (e.g. CUDA unavailable)
                warnings.warn(
                    f"SeededGenerators: the random-generator state saved for device {key!r} cannot be restored "
                    "on this machine; that device's generator starts from the seed instead",
                    AdaptationWarning,
                    stacklevel=2,
                )
                continue
            g.set_state(v)
            gens[key] = g
        self._gens = gens
