"""Shared selection of the entropy-style methods (Tent, ETA/EATA, SHOT-IM): norm-layer affine parameters.

:class:`NormAffineMixin` supplies :meth:`~adaptkit.TTAMethod.select`, ``trainable_parameters`` and
``train_modules`` for methods that adapt the ``weight`` / ``bias`` of normalisation layers, and
:meth:`NormAffineMixin.use_batch_statistics` for their ``configure``: BatchNorm layers run in training form with
``track_running_stats=False`` (batch statistics; the running buffers are kept and never written; the base class
records and restores the flag). ``norm="auto"`` selects BatchNorm layers when the model has any, otherwise
LayerNorm and GroupNorm layers (the variant of mariodoebler/test-time-adaptation for BN-free networks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from adaptkit.core.layers import norm_kind, select_norm_layers

__all__ = ["NormAffineMixin"]


class NormAffineMixin:
    """``select`` / ``trainable_parameters`` / ``train_modules`` of norm-affine methods (mix in before
    :class:`~adaptkit.TTAMethod`). The subclass sets ``_norm``, ``_include`` and ``_exclude`` before calling
    ``TTAMethod.__init__`` and calls :meth:`use_batch_statistics` from its ``configure``."""

    _norm: str | Sequence[str]
    _include: str | Sequence[str] | None
    _exclude: str | Sequence[str] | None
    inner: nn.Module
    _targets: dict[str, nn.Module]

    def _kinds(self) -> list[str]:
        if self._norm != "auto":
            return [self._norm] if isinstance(self._norm, str) else list(self._norm)
        has_bn = any(norm_kind(m) == "batch" for m in self.inner.modules())
        return ["batch"] if has_bn else ["layer", "group"]

    def select(self) -> dict[str, nn.Module]:
        who = type(self).__name__
        sel = select_norm_layers(self.inner, self._kinds(), self._include, self._exclude, who=who)
        sel = {
            n: m
            for n, m in sel.items()
            if getattr(m, "weight", None) is not None or getattr(m, "bias", None) is not None
        }
        if not sel:
            raise ValueError(f"{who}: the selected norm layers have no affine parameters (affine=False) to adapt")
        return sel

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = []
        for m in self._targets.values():
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter):
                    params.append(p)
        return params

    def train_modules(self) -> list[str]:
        return [n for n, m in self._targets.items() if norm_kind(m) == "batch"]

    def use_batch_statistics(self) -> None:
        """Selected BatchNorm layers normalise with batch statistics; their buffers are kept and never written."""
        for name in self.train_modules():
            self._targets[name].track_running_stats = False
