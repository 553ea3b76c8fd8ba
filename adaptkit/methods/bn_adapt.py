"""BNAdapt: BatchNorm statistics from the test data with a source prior of ``N`` pseudo-samples."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from adaptkit.core.base import TTAMethod
from adaptkit.core.bn import BNStatsOverride
from adaptkit.core.layers import select_norm_layers
from adaptkit.functional.moments import Moments, bn_prior_mix, merge_moments
from adaptkit.registry import register_method
from adaptkit.shift import ShiftScore, shift_from_moments


@register_method
class BNAdapt(TTAMethod):
    """Normalise every BatchNorm layer with a mix of source and test statistics (Schneider et al., 2020).

    For each BN layer and forward: ``mu = N/(N+n) mu_s + n/(N+n) mu_t`` and the same for the variance, where
    ``mu_t``/``var_t`` are the test batch's channel mean and **unbiased** variance, ``n`` the number of test
    samples (images) behind them and ``N`` the prior strength in the same unit. ``N=0`` is pure test
    statistics (PTBN), ``N=inf`` the source model. The running buffers are never written.

    Args:
        model: any model with BatchNorm layers that track running statistics.
        N: prior strength in pseudo-samples (``>= 0``; ``float("inf")`` allowed).
        accumulate: "full adaptation": pool test statistics over every sample since the last :meth:`reset`
            (``n`` is the pooled sample count).
        include / exclude: restrict the BN layers (a full-match regex or a list of names / dotted suffixes).
        episodic: reset before every batch (default ``False``; only matters with ``accumulate=True``).
        check_inputs: reject empty or non-finite batches.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> with adaptkit.BNAdapt(model, N=16) as bn:
        ...     logits = bn(torch.randn(8, 3, 32, 32))
        >>> logits.shape
        torch.Size([8, 10])
    """

    name = "bn_adapt"
    uses_grad = False
    default_episodic = False

    def __init__(
        self,
        model: nn.Module,
        N: float = 16,
        accumulate: bool = False,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        episodic: bool | None = None,
        check_inputs: bool = True,
    ) -> None:
        N = float(N)
        if math.isnan(N) or N < 0:
            raise ValueError(f"BNAdapt: N must be >= 0 (0 = test statistics only, inf = source), got {N}")
        self.N = N
        self.accumulate = bool(accumulate)
        self._include, self._exclude = include, exclude
        self._acc: dict[str, Moments] = {}
        self._last: dict[str, Moments] = {}
        self._acc_lock = threading.Lock()
        super().__init__(model, episodic=episodic, check_inputs=check_inputs)

    def select(self) -> dict[str, nn.Module]:
        return select_norm_layers(
            self.inner, ["batch"], self._include, self._exclude, who="BNAdapt", require_running_stats=True
        )

    def configure(self) -> None:
        BNStatsOverride(self._targets, self._policy, self.hooks)

    def _policy(self, name: str, module: nn.Module, mom: Moments) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.accumulate:
            with self._acc_lock:
                prev = self._acc.get(name)
                if prev is not None and prev.mean.device != mom.mean.device:
                    prev = Moments(*(t.to(mom.mean.device) for t in prev[:2]), prev.count, prev.samples)
                wide = Moments(mom.mean.double(), mom.var.double(), mom.count, mom.samples)
                mom = merge_moments(prev, wide)
                self._acc[name] = mom
        self._last[name] = mom
        if math.isinf(self.N):
            return None
        if mom.count < 2 and self.N == 0:
            raise ValueError(
                f"BNAdapt(N=0): layer {name!r} sees a single value per channel (batch size 1 with a 1x1 map), "
                "which has no variance; use N > 0 (e.g. N=16) or a larger batch"
            )
        if self.N == 0 and mom.samples < 8:
            self.warn_once(
                "small_n", f"N=0 with {mom.samples} samples per batch gives noisy statistics; N=16 is safer"
            )
        mean, var = bn_prior_mix(
            module.running_mean.to(mom.mean.dtype),
            module.running_var.to(mom.var.dtype),
            mom.mean,
            mom.var,
            self.N,
            mom.samples,
        )
        return mean, var

    def adapt_step(self, x: Any) -> Any:
        return self.model(x)

    def reset_state(self) -> None:
        self._acc.clear()
        self._last.clear()

    def method_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for name, m in self._acc.items():
            state[f"acc.{name}"] = {
                "mean": m.mean.clone(),
                "var": m.var.clone(),
                "count": m.count,
                "samples": m.samples,
            }
        return state

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._acc = {
            k[4:]: Moments(v["mean"], v["var"], v["count"], v["samples"])
            for k, v in state.items()
            if k.startswith("acc.")
        }

    def shift_score(self, normalize: bool = True) -> ShiftScore:
        """Wasserstein-2 distance between source and test statistics seen by the wrapper.

        Uses the pooled statistics with ``accumulate=True``, else the last batch's.
        """
        stats = self._acc if self.accumulate and self._acc else self._last
        if not stats:
            raise RuntimeError("BNAdapt.shift_score: run at least one batch through the wrapper first")
        return shift_from_moments(self._targets, stats, normalize=normalize)

    def extra_repr(self) -> str:
        return f"N={self.N}, accumulate={self.accumulate}, " + super().extra_repr()
