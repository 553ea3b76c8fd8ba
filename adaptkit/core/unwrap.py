"""Strip DataParallel / DistributedDataParallel / torch.compile wrappers and their key prefixes."""

from __future__ import annotations

import torch.nn as nn

_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module inside DP/DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Example:
        >>> import torch.nn as nn
        >>> from adaptkit.core import unwrap_model
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def is_compiled(model: nn.Module) -> bool:
    """True for a ``torch.compile`` result (an ``OptimizedModule``) anywhere in the wrapper chain."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            return True
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        return False


def strip_prefix(key: str) -> str:
    """Remove leading ``module.`` / ``_orig_mod.`` components from a state-dict key.

    Example:
        >>> from adaptkit.core import strip_prefix
        >>> strip_prefix("module._orig_mod.layer1.0.bn1.weight")
        'layer1.0.bn1.weight'
    """
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key = key[len(p) :]
                changed = True
    return key
