"""Tensor memory of a piece of code, counted op by op: the same figure on any machine (no allocator caches).

:class:`TensorMemory` is a ``TorchDispatchMode``: every tensor an operator returns (forward and backward, on any
device) is attributed to its storage; a storage counts its ``nbytes`` from the first time it is seen until it is
freed (a weak reference on the storage object, which torch keeps alive exactly as long as the storage). Tensors
that existed before the mode was entered are not counted: the figure is what the code *allocated*. ``peak`` is
the highest total alive at once, ``current`` what is still alive now (it keeps falling after the ``with`` block as
tensors are freed).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Count the bytes of the tensors allocated inside the ``with`` block (peak and still alive).

    Example:
        >>> import torch
        >>> from adaptkit.bench.memory import TensorMemory
        >>> x = torch.ones(1000)
        >>> with TensorMemory() as mem:
        ...     y = x * 2          # 4,000 bytes
        ...     z = (y + 1) * 3    # a 4,000-byte temporary, then 4,000 bytes kept
        ...     del y
        >>> mem.peak, mem.current
        (12000, 4000)
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        with self._lock:
            n = self._live.pop(key, None)
            if n is not None:
                self.current -= n

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (nested, functional wrappers)
            return
        key = storage._cdata
        with self._lock:
            if key in self._live:
                return
            n = storage.nbytes()
            self._live[key] = n
            self.current += n
            self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    @staticmethod
    def _key(t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):
            return None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # views and aliases of the inputs (``x.view``, a no-op ``x.to``) allocate nothing: skip their storages
        inputs = {self._key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and self._key(t) not in inputs:
                self._track(t)
        return out
