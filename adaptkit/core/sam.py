"""Sharpness-aware minimisation (SAM, Foret et al., ICLR 2021) around any base ``torch.optim.Optimizer``.

A SAM update takes two gradients: one at the current weights ``w`` (it gives the ascent direction) and one at the
perturbed weights ``w + e(w)``, where ``e(w) = rho * g / ||g||`` with one global L2 norm over every parameter that
has a gradient (the adaptive variant, ASAM, uses ``e(w) = rho * w^2 * g / ||w * g||``). The base optimizer then
steps *from* ``w`` with the gradient taken at ``w + e(w)``. This follows the reference implementation
(github.com/davda54/sam, ``sam.py``, as vendored by SAR: github.com/mr-eggplant/SAR ``sam.py``, commit
``492c1add1164a504fd362962cb18715fb7495f96``), with three differences:

* the base optimizer is passed as an instance and stays the caller's optimizer: its ``state`` (momentum) is the
  only persistent state, so clearing it clears everything (the reference keeps the base optimizer's momentum in a
  second ``state`` that its own ``load_state_dict`` never touches, so SAR's "reset the optimizer" kept it);
* the weights are restored with ``copy_`` into the same tensors (identity kept for hooks and the optimizer), and the
  backup is dropped right after the restore, so nothing is held between steps;
* :meth:`SAM.perturbed` is a context manager that always restores the weights, also when the second forward or
  backward raises.

Example:
    >>> import torch
    >>> from adaptkit.core.sam import SAM
    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5)
    >>> (w**2).sum().backward()  # g = 2w = (6, 8), ||g|| = 10
    >>> with sam.perturbed():  # w + 0.5 * g / 10
    ...     print(w.detach().tolist())
    ...     (w**2).sum().backward()  # the gradient at the perturbed point, 2 * (3.3, 4.4)
    [3.299999952316284, 4.400000095367432]
    >>> sam.base_step()  # restored to (3, 4), then SGD with the perturbed-point gradient
    >>> [round(v, 4) for v in w.detach().tolist()]
    [2.34, 3.12]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

__all__ = ["SAM", "sam_grad_norm", "sam_perturbation"]


def sam_grad_norm(params: Iterable[torch.Tensor], adaptive: bool = False) -> torch.Tensor:
    """One global L2 norm of the gradients, ``||g||`` (ASAM: ``||w * g||``), over the parameters that have one.

    Each parameter's norm is moved to the first parameter's device before they are combined (model parallelism).
    Returns a zero scalar when no parameter has a gradient.

    Example:
        >>> import torch
        >>> from adaptkit.core.sam import sam_grad_norm
        >>> a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        >>> a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
        >>> float(sam_grad_norm([a, b]))
        5.0
    """
    params = list(params)
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        device = params[0].device if params else None
        return torch.zeros((), device=device)
    device = with_grad[0].device
    norms = [((p.detach().abs() * p.grad) if adaptive else p.grad).norm(p=2).to(device) for p in with_grad]
    return torch.stack(norms).norm(p=2)


def sam_perturbation(
    params: Iterable[torch.Tensor], rho: float, adaptive: bool = False, eps: float = 1e-12
) -> list[torch.Tensor | None]:
    """The ascent step ``e(w) = rho * g / (||g|| + eps)`` per parameter (``None`` where a parameter has no gradient).

    ASAM (``adaptive=True``): ``e(w) = rho * w^2 * g / (||w * g|| + eps)``, as in the reference ``first_step``.
    The norm is global over all parameters with a gradient (:func:`sam_grad_norm`). Pure: nothing is modified.

    Example:
        >>> import torch
        >>> from adaptkit.core.sam import sam_perturbation
        >>> w = torch.zeros(2, requires_grad=True)
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> sam_perturbation([w], rho=1.0)[0].tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    params = list(params)
    scale = rho / (sam_grad_norm(params, adaptive) + eps)
    out: list[torch.Tensor | None] = []
    for p in params:
        if p.grad is None:
            out.append(None)
            continue
        g = p.grad.detach()
        e = (p.detach().pow(2) * g if adaptive else g) * scale.to(p)
        out.append(e)
    return out


class SAM:
    """Sharpness-aware minimisation around a base optimizer: ascent, second gradient, restore, base step.

    Use it as::

        loss(model(x)).backward()          # gradient at w
        with sam.perturbed():              # w <- w + e(w); always back to w on exit
            loss(model(x)).backward()      # gradient at w + e(w)
        sam.base_step()                    # base optimizer steps from w with that gradient

    or with the reference names ``first_step()`` / ``second_step()``, or ``step(closure)``.

    Args:
        optimizer: the base optimizer (any ``torch.optim.Optimizer``); its parameter groups are the parameters
            SAM perturbs, and its ``state`` is the only state kept between steps.
        rho: neighbourhood radius (SAR: 0.05).
        adaptive: ASAM's scale-invariant perturbation ``rho * w^2 * g / ||w * g||`` (reference flag).
        eps: added to the gradient norm (reference: 1e-12).

    Raises:
        ValueError: ``rho`` negative or ``eps`` not positive.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"SAM: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not rho >= 0.0:
            raise ValueError(f"SAM: rho must be non-negative, got {rho}")
        if not eps > 0.0:
            raise ValueError(f"SAM: eps must be positive, got {eps}")
        self.optimizer = optimizer
        self.rho, self.adaptive, self.eps = float(rho), bool(adaptive), float(eps)
        self._backup: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters of the base optimizer, in group order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def is_perturbed(self) -> bool:
        """``True`` between :meth:`first_step` and the restore."""
        return bool(self._backup)

    def zero_grad(self) -> None:
        """Drop every gradient of the optimizer's parameters (``set_to_none``)."""
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Ascent: ``w <- w + e(w)`` from the current gradients, keeping a copy of ``w``; then drop the gradients.

        Parameters without a gradient are not moved. Raises ``RuntimeError`` if already perturbed.
        """
        if self._backup:
            raise RuntimeError("SAM.first_step: the weights are already perturbed; call restore() or second_step()")
        params = self.params
        for p, e in zip(params, sam_perturbation(params, self.rho, self.adaptive, self.eps)):
            if e is None:
                continue
            self._backup.append((p, p.detach().clone()))
            p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved ``w`` back into the perturbed parameters (in place, bitwise); a no-op if not perturbed."""
        backup, self._backup = self._backup, []
        for p, saved in backup:
            p.copy_(saved)

    def base_step(self, zero_grad: bool = True) -> None:
        """Restore ``w`` (if still perturbed), then take the base optimizer's step with the current gradients."""
        self.restore()
        self.optimizer.step()
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad: bool = True) -> None:
        """Reference name of :meth:`base_step`."""
        self.base_step(zero_grad)

    @contextlib.contextmanager
    def perturbed(self, zero_grad: bool = True) -> Iterator[None]:
        """Context manager: :meth:`first_step` on entry, :meth:`restore` on exit (also on exceptions).

        The base step is left to the caller (:meth:`base_step`), so that it can skip it (e.g. no valid loss).
        """
        self.first_step(zero_grad=zero_grad)
        try:
            yield
        finally:
            self.restore()

    def step(self, closure: object) -> object:
        """A full SAM step: ``closure`` (forward + backward, returning the loss) runs at ``w + e(w)``.

        The gradients at ``w`` must already be in ``.grad`` (a first backward). Returns the closure's value.
        """
        if not callable(closure):
            raise TypeError("SAM.step needs a closure that recomputes the loss and calls backward()")
        with self.perturbed(), torch.enable_grad():
            value = closure()
        self.base_step()
        return value

    def clear(self, restore: bool = True) -> None:
        """Clear the base optimizer's state (momentum, moments) and any pending perturbation.

        Args:
            restore: write the saved ``w`` back first (default). ``False`` only forgets the backup, for a caller
                that has just reset the weights from its own copy (a source snapshot) and must not overwrite them.
        """
        if restore:
            self.restore()
        self._backup = []
        self.optimizer.state.clear()
