"""TTT: test-time training with rotation prediction (Sun et al. 2020; spec ../shared/reference/baselines.md
section 9)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn as nn

from adaptkit.functional.rotation import ROTATION_MODES
from adaptkit.heads.base import AuxHead
from adaptkit.heads.rotation import RotationHead
from adaptkit.methods._aux import AuxHeadMethod, LayerArg
from adaptkit.registry import register_method


@register_method
class TTT(AuxHeadMethod):
    """Adapt the shared encoder (every parameter that runs before the tapped layer) **and** the rotation head so
    that the head predicts the rotation of the test images better (Sun et al., *Test-Time Training with
    Self-Supervision for Generalization under Distribution Shifts*, ICML 2020).

    Per batch (episodic by default, as the paper's standard protocol: weights restored before every batch):
    ``steps`` iterations of SGD on the rotation cross-entropy of the rotated test batch, each a forward truncated
    at the tapped layer plus the head; then a full eval-mode forward of the clean batch gives the predictions.

    Test-time input (``rotations``): ``"all"`` (default) feeds each image of the batch in its four rotations
    (``4B`` samples, deterministic); ``"random"`` gives each image one random rotation (``B`` samples), as the
    official code. The official per-image protocol (32 random crop + flip copies of *one* image, each with a
    random rotation, 10 SGD steps, predict the clean image) is the special case of a batch of augmented copies
    of one image: ``x = torch.stack([img] + [augment(img) for _ in range(31)])`` with ``rotations="random"``,
    and the clean image's prediction is ``ttt(x)[0]`` (adaptkit does not implement the augmentations). With
    BatchNorm, batch statistics over copies of one image are degenerate (the paper prefers GroupNorm models).
    TTT-Online: ``episodic=False, steps=1``.

    Args:
        model: the source classifier (ideally trained jointly with the head: ``TTT.train_head(..., joint=True)``).
        layer: stage index or qualified name of the last layer of the shared encoder (paper: ``layer2`` of a
            ResNet-26, i.e. ``layer=2``); default: the head's binding.
        head: a trained :class:`~adaptkit.heads.rotation.RotationHead` (``TTT.train_head`` or
            ``RotationHead.load``). The wrapper adapts a private copy (``wrapper.head``, put back by ``reset()``
            and ``restore()``); the head passed in is never modified.
        lr: SGD learning rate (paper 1e-3).
        steps: iterations per batch (paper 10; TTT-Online 1).
        optimizer: ``"sgd"`` (paper), ``"adam"`` or a callable ``params -> torch.optim.Optimizer``.
        momentum / weight_decay: SGD's (paper: none).
        rotations: ``"all"`` or ``"random"`` (above).
        bn_mode: ``"refresh"`` (default, the official behaviour): the encoder's BatchNorm layers run in training
            form while adapting (batch statistics, running statistics updated) and the prediction uses the
            refreshed statistics; the layers above the tap keep the source statistics (the official main branch
            never runs while adapting). ``"batch"`` / ``"source"``: see
            :class:`~adaptkit.methods._aux.AuxHeadMethod`.
        episodic, truncate, seed, check_inputs: see :class:`~adaptkit.methods._aux.AuxHeadMethod` (``seed`` fixes
            the random rotations; re-seeded on reset, so episodic forwards repeat exactly).

    Example:
        >>> import torch, torchvision
        >>> from adaptkit.methods.ttt import TTT
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> data = [torch.rand(4, 3, 32, 32) for _ in range(2)]
        >>> head = TTT.train_head(model, layer=2, loader=data, epochs=1, progress=False)
        >>> with TTT(model, layer=2, head=head, steps=2) as ttt:
        ...     preds = ttt(torch.rand(4, 3, 32, 32)).argmax(1)
        >>> preds.shape
        torch.Size([4])
    """

    name = "ttt"
    head_class = RotationHead
    adapt_head = True

    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "steps": 10, "optimizer": "sgd", "momentum": 0.0}

    def __init__(
        self,
        model: nn.Module,
        layer: LayerArg = None,
        head: RotationHead | None = None,
        *,
        rotations: str = "all",
        **kwargs: Any,
    ) -> None:
        if rotations not in ROTATION_MODES:
            raise ValueError(f"adaptkit.TTT: rotations must be one of {ROTATION_MODES}, got {rotations!r}")
        self.rotations = rotations
        super().__init__(model, layer, head, **kwargs)

    def select(self) -> dict[str, nn.Module]:
        """As :class:`AuxHeadMethod`, except that with ``bn_mode="refresh"`` the BatchNorm layers above the tapped
        layer are not targeted: they keep the source statistics, as in the official code, where only the shared
        encoder and the SSL head run (``ssh.train()``) while adapting and the main branch never does."""
        sel = super().select()
        if self.bn_mode == "refresh":
            for n in self._above_bn:
                sel.pop(n, None)
            self._above_bn = []
        return sel

    def adapt_step(self, x: Any) -> Any:
        """One SGD step on the rotation loss of ``x`` rotated as ``rotations`` says (encoder and head)."""
        assert self.optimizer is not None
        if not self.head.training:  # a user's wrapper.head.eval() changes nothing (as model.eval() does not)
            self.head.train()
        x_aux, targets = self.head.prepare(x, self._gen, mode=self.rotations)
        loss = self.head.test_loss(self.features(x_aux), targets, self._gen)
        self.step(loss)
        return None

    @classmethod
    def make_head(cls, feature_shapes: list[tuple[int, ...]], **kwargs: Any) -> AuxHead:
        """A :class:`RotationHead` sized for the tapped layer's channels (``width`` defaults to them)."""
        return RotationHead(feature_shapes[0][0], **kwargs)

    def extra_repr(self) -> str:
        return f"rotations={self.rotations!r}, " + super().extra_repr()
