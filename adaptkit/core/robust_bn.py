"""Robust BatchNorm (RoTTA): global statistics that follow the test stream by an exponential moving average.

Each selected BatchNorm layer keeps a *global* mean and variance, initialised from its source running statistics
and held here (method state), never in the layer's buffers. Two kinds of forward:

* **update** forwards (inside :meth:`RobustBN.update`, RoTTA's train-mode forwards on the memory):
  ``mu <- (1 - alpha) mu + alpha mean_B(x)``, ``var <- (1 - alpha) var + alpha var_B(x)`` (biased batch
  variance), then the layer normalises with the *updated* statistics;
* every other forward normalises with the global statistics as they are (RoTTA's eval mode).

As in the official ``RobustBN2d`` (BIT-DA/RoTTA ``core/utils/bn_layers.py``, commit 67e34c9), the stored statistics
are detached, but the update forward's normalisation keeps the gradient through the batch moments (scaled by
``alpha``). The layer still runs its own kernel, in inference form, with the statistics swapped in for this call
only (owned hooks, put back even when the forward raises); the gradient through the statistics is routed through
the affine parameters by an exact re-parametrisation whose value is the layer's own (see :func:`_reparametrise`),
so layers that do more than normalise (timm ``BatchNormAct2d``) keep their activation. Nothing is patched on the
class and the running buffers are never written.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from adaptkit.core.hooks import HookManager


def robust_bn_update(
    global_mean: torch.Tensor,
    global_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 - alpha) * global_mean + alpha * batch_mean, (1 - alpha) * global_var + alpha * batch_var)``.

    Example:
        >>> import torch
        >>> from adaptkit.core.robust_bn import robust_bn_update
        >>> m, v = robust_bn_update(torch.zeros(1), torch.ones(1), torch.ones(1), torch.zeros(1), 0.25)
        >>> m.item(), v.item()
        (0.25, 0.75)
    """
    return (1 - alpha) * global_mean + alpha * batch_mean, (1 - alpha) * global_var + alpha * batch_var


def _reparametrise(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine parameters that make the inference-form kernel, fed the *detached* ``mean`` / ``var``, carry the
    gradient of ``(x - mean) / sqrt(var + eps) * weight + bias`` through ``mean`` and ``var`` as well.

    With ``s = sqrt(var + eps)`` and ``d`` for detached: ``w' = w * s_d / s`` and ``b' = b + w * (mean_d - mean) / s``.
    Their values are exactly ``w`` and ``b`` (``s_d / s == 1``, ``mean_d - mean == 0``), so the kernel's output is
    bitwise what it gives with the plain parameters; and ``(x - mean_d) / s_d * w' + b' = (x - mean) / s * w + b``
    as a function, so the gradients are those of the official formula.
    """
    s = torch.sqrt(var + eps)
    ratio = s.detach() / s
    w = weight if weight is not None else torch.ones_like(mean)
    b = bias if bias is not None else torch.zeros_like(mean)
    dtype = w.dtype
    new_w = (w * ratio).to(dtype)
    new_b = (b + w * (mean.detach() - mean) / s).to(dtype)
    return new_w, new_b


class RobustBN:
    """RoTTA's Robust BatchNorm on a set of BatchNorm layers, through owned hooks (see the module docstring).

    Args:
        layers: ``{qualified_name: bn_module}``; every module a ``_BatchNorm`` with running statistics.
        hooks: the owning :class:`HookManager` (its ``remove_all`` detaches everything and puts back anything a
            ``BaseException`` left swapped).
        alpha: weight of the batch in the update (RoTTA: 0.05).

    Attributes:
        mean / var: ``{name: tensor}``, the global statistics (float32 at least, on the layer's device).
        source: ``{name: (mean, var)}``, their wrap-time values.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptkit.core import HookManager
        >>> from adaptkit.core.robust_bn import RobustBN
        >>> bn, hooks = nn.BatchNorm1d(1).eval(), HookManager()   # source statistics: mean 0, var 1
        >>> rbn = RobustBN({"bn": bn}, hooks, alpha=0.5)
        >>> with rbn.update():
        ...     _ = bn(torch.tensor([[1.0], [3.0]]))   # batch mean 2, biased var 1
        >>> rbn.mean["bn"].tolist(), rbn.var["bn"].tolist(), bn.running_mean.tolist()
        ([1.0], [1.0], [0.0])
        >>> hooks.remove_all()
    """

    def __init__(self, layers: dict[str, nn.Module], hooks: HookManager, alpha: float = 0.05) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"RobustBN: alpha must be in [0, 1], got {alpha}")
        for name, m in layers.items():
            if not isinstance(m, _BatchNorm) or getattr(m, "running_mean", None) is None:
                raise ValueError(f"RobustBN: {name!r} is not a BatchNorm layer with running statistics")
        self.alpha = float(alpha)
        self.updating = False
        self.source: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mean: dict[str, torch.Tensor] = {}
        self.var: dict[str, torch.Tensor] = {}
        for name, m in layers.items():
            dtype = torch.promote_types(m.running_mean.dtype, torch.float32)
            src = (m.running_mean.detach().to(dtype).clone(), m.running_var.detach().to(dtype).clone())
            self.source[name] = src
            self.mean[name] = src[0].clone()
            self.var[name] = src[1].clone()
        self._lock = threading.Lock()
        self._stash: dict[int, tuple[nn.Module, Any, Any, Any, Any, bool]] = {}
        for name, m in layers.items():
            hooks.forward_pre(m, self._make_pre(name))
            hooks.forward(m, self._make_post(), always_call=True)
        hooks.on_remove(self.unstash_all)

    # ------------------------------------------------------------------ public
    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        """Forwards inside the block update the global statistics and normalise with the updated values."""
        before = self.updating
        self.updating = True
        try:
            yield
        finally:
            self.updating = before

    @torch.no_grad()
    def reset(self) -> None:
        """Global statistics back to the source values (in place, bitwise)."""
        for name, (mean, var) in self.source.items():
            self.mean[name].copy_(mean)
            self.var[name].copy_(var)

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix + name + ".mean" / ".var": clone}`` for checkpoints."""
        out: dict[str, torch.Tensor] = {}
        for name in self.mean:
            out[f"{prefix}{name}.mean"] = self.mean[name].detach().clone()
            out[f"{prefix}{name}.var"] = self.var[name].detach().clone()
        return out

    def check_state(self, state: dict[str, Any], prefix: str = "") -> None:
        """Raise ``ValueError`` unless ``state`` holds every layer's statistics with the right shapes."""
        for name in self.mean:
            for kind, live in (("mean", self.mean[name]), ("var", self.var[name])):
                v = state.get(f"{prefix}{name}.{kind}")
                if not isinstance(v, torch.Tensor) or v.shape != live.shape:
                    raise ValueError(
                        f"RobustBN: the state lacks {prefix}{name}.{kind} of shape {tuple(live.shape)}; this state "
                        "was saved for another model"
                    )

    @torch.no_grad()
    def load_state(self, state: dict[str, Any], prefix: str = "") -> None:
        """Inverse of :meth:`state` (checked first with :meth:`check_state`)."""
        self.check_state(state, prefix)
        for name in self.mean:
            self.mean[name].copy_(state[f"{prefix}{name}.mean"])
            self.var[name].copy_(state[f"{prefix}{name}.var"])

    # ------------------------------------------------------------------ hooks
    def _make_pre(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            buf, params = module._buffers, module._parameters
            weight = bias = None
            with self._lock:
                g_mean, g_var = self.mean[name], self.var[name]
                if self.updating:
                    dims = [0, *range(2, x.dim())]
                    b_var, b_mean = torch.var_mean(x.to(g_mean.dtype), dim=dims, unbiased=False)
                    mean, var = robust_bn_update(
                        g_mean, g_var, b_mean.to(g_mean.device), b_var.to(g_mean.device), self.alpha
                    )
                    # a channel whose statistics overflowed keeps its global statistics (never store NaN / Inf)
                    mean = torch.where(torch.isfinite(mean), mean, g_mean)
                    var = torch.where(torch.isfinite(var), var, g_var)
                    with torch.no_grad():
                        g_mean.copy_(mean.detach())
                        g_var.copy_(var.detach())
                    if torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad):
                        weight, bias = _reparametrise(
                            params.get("weight"),
                            params.get("bias"),
                            mean.to(x.device),
                            var.to(x.device),
                            module.eps,  # type: ignore[arg-type]
                        )
                use_mean, use_var = g_mean.detach().clone(), g_var.detach().clone()
                if id(module) in self._stash:  # left swapped by an interrupted forward: put the originals back
                    self._unstash(id(module))
                self._stash[id(module)] = (
                    module,
                    buf["running_mean"],
                    buf["running_var"],
                    params.get("weight"),
                    params.get("bias"),
                    module.training,
                )
            buf["running_mean"] = use_mean.to(device=x.device, dtype=buf["running_mean"].dtype)
            buf["running_var"] = use_var.to(device=x.device, dtype=buf["running_var"].dtype)
            if weight is not None:
                params["weight"], params["bias"] = weight, bias  # type: ignore[assignment]
            module.training = False  # inference form: normalise with the swapped-in statistics, write nothing

        return pre

    def _make_post(self) -> Callable[[nn.Module, Any, Any], None]:
        def post(module: nn.Module, inputs: Any, output: Any) -> None:
            with self._lock:
                self._unstash(id(module))

        return post

    def _unstash(self, key: int) -> None:
        saved = self._stash.pop(key, None)
        if saved is not None:
            module, mean, var, weight, bias, training = saved
            module._buffers["running_mean"], module._buffers["running_var"] = mean, var
            module._parameters["weight"], module._parameters["bias"] = weight, bias
            module.training = training

    def unstash_all(self) -> None:
        """Put back every buffer / parameter still swapped (after a forward interrupted by a ``BaseException``)."""
        with self._lock:
            for key in list(self._stash):
                self._unstash(key)

    def __repr__(self) -> str:
        return f"RobustBN(layers={len(self.mean)}, alpha={self.alpha})"
