"""NC-TTT: noise-contrastive test-time training (seed ncttt-paper.txt; spec ../shared/reference/ncttt.md)."""

from __future__ import annotations

from typing import Any, ClassVar

from adaptkit.heads.base import AuxHead
from adaptkit.heads.ncttt import NCTTTHead
from adaptkit.methods._aux import AuxHeadMethod
from adaptkit.registry import register_method


@register_method
class NCTTT(AuxHeadMethod):
    """Adapt the encoder up to a tapped layer so that a noise-contrastive discriminator sees its projected
    features as in-distribution (Osowiechi et al., NC-TTT).

    Per batch (episodic by default, as the paper: the weights are restored before every batch): ``steps``
    iterations of Adam on ``-mean log P_in(projector(features))`` over every parameter that runs before the
    tapped layer (BatchNorm included), each iteration a forward truncated at the tapped layer; then a full
    eval-mode forward gives the predictions. ``bn_mode="refresh"`` reproduces the reference's BatchNorm
    behaviour (see :mod:`adaptkit.methods._aux`).

    Args:
        model: the source classifier.
        layer: stage index or qualified name of the tapped layer (default: the head's binding).
        head: a trained :class:`~adaptkit.NCTTTHead` (``NCTTT.train_head`` or ``NCTTTHead.load``).
        lr: Adam learning rate (official code default 1e-5).
        steps: iterations per batch (paper Fig. 6: accuracy peaks near 20).
        optimizer, momentum, weight_decay, bn_mode, episodic, truncate, seed, check_inputs: see
            :class:`~adaptkit.methods._aux.AuxHeadMethod`.

    Example:
        >>> import torch, torchvision, adaptkit
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> data = [(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
        >>> head = adaptkit.NCTTT.train_head(model, layer=1, loader=data, epochs=1, progress=False)
        >>> with adaptkit.NCTTT(model, layer=1, head=head, steps=2) as nc:
        ...     preds = nc(torch.rand(8, 3, 32, 32)).argmax(1)
        >>> preds.shape
        torch.Size([8])
    """

    name = "ncttt"
    head_class = NCTTTHead

    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-5, "steps": 20, "optimizer": "adam", "momentum": 0.9}

    @classmethod
    def make_head(cls, feature_shapes: list[tuple[int, ...]], **kwargs: Any) -> AuxHead:
        """An :class:`NCTTTHead` sized for the tapped features (``mode="flat"`` gets ``spatial`` from them)."""
        c, *hw = feature_shapes[0]
        if kwargs.get("mode") == "flat" and kwargs.get("spatial") is None:
            kwargs["spatial"] = tuple(hw)
        return NCTTTHead(c, **kwargs)
