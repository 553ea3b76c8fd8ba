"""ClusT3: information-invariant test-time training by feature clustering (Hakim et al., ICCV 2023; spec
../shared/reference/ncttt.md section 2)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn as nn

from adaptkit.heads.base import AuxHead
from adaptkit.heads.clust3 import ClusT3Head
from adaptkit.methods._aux import AuxHeadMethod
from adaptkit.registry import register_method


@register_method
class ClusT3(AuxHeadMethod):
    """Adapt the encoder up to one or more tapped layers so that the clustering projectors trained on the
    source again find confident, balanced clusters in the test features (Hakim et al., ClusT3).

    Per batch (episodic by default, as the official code: the weights are restored before every batch):
    ``steps`` iterations of Adam on ``sum over projectors of H(Z|X) - H(Z)`` over every parameter that runs
    before the deepest tapped layer (BatchNorm included; the projectors stay fixed), each iteration a forward
    truncated right after the deepest tapped layer; then a full eval-mode forward gives the predictions.
    ``bn_mode="refresh"`` reproduces the reference's BatchNorm behaviour (train-mode iterations, eval-mode
    re-forward with the refreshed running statistics; see :mod:`adaptkit.methods._aux`).

    Args:
        model: the source classifier.
        layer: stage index or qualified name, or a list of them for projectors on several layers (e.g.
            ``[1, 2]``, the README's best CIFAR setup); default: the head's binding.
        head: a trained :class:`~adaptkit.heads.clust3.ClusT3Head` (``ClusT3.train_head`` or
            ``ClusT3Head.load``).
        lr: Adam learning rate (official code default 1e-5).
        steps: iterations per batch (default 20: the VisDA code's value and where the NC-TTT paper's accuracy
            curve peaks; the CIFAR code's ``--niter`` default is 50).
        optimizer, momentum, weight_decay, bn_mode, episodic, truncate, seed, check_inputs: see
            :class:`~adaptkit.methods._aux.AuxHeadMethod`.

    Example:
        >>> import torch, torchvision
        >>> from adaptkit.methods.clust3 import ClusT3
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> data = [torch.rand(8, 3, 32, 32) for _ in range(2)]
        >>> head = ClusT3.train_head(model, layer=[1, 2], loader=data, epochs=1, progress=False)
        >>> with ClusT3(model, layer=[1, 2], head=head, steps=2) as ct:
        ...     preds = ct(torch.rand(8, 3, 32, 32)).argmax(1)
        >>> preds.shape, ct.layers
        (torch.Size([8]), ['layer1', 'layer2'])
    """

    name = "clust3"
    head_class = ClusT3Head

    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-5, "steps": 20, "optimizer": "adam", "momentum": 0.9}

    def select(self) -> dict[str, nn.Module]:
        """The shared selection, plus a check that the head has one projector set per tapped layer."""
        sel = super().select()
        head = self._head
        assert isinstance(head, ClusT3Head)
        if len(self.layers) != len(head.in_channels):  # an unbound head: the binding check could not tell
            raise ValueError(
                f"{self._who()}: the head has projectors for {len(head.in_channels)} layer(s) "
                f"(in_channels={head.in_channels}) but layer= gives {len(self.layers)}: {self.layers}"
            )
        return sel

    @classmethod
    def make_head(cls, feature_shapes: list[tuple[int, ...]], **kwargs: Any) -> AuxHead:
        """A :class:`ClusT3Head` with one projector set per tapped layer, sized from the features' channels
        (``kwargs``: ``num_clusters``, ``num_projectors``, ``projector``)."""
        return ClusT3Head([int(s[0]) for s in feature_shapes], **kwargs)
