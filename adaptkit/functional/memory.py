"""Category-balanced memory banks for online test-time adaptation.

:class:`CSTUMemory` is RoTTA's *category-balanced sampling with timeliness and uncertainty* (Yuan et al., CVPR
2023): a fixed-capacity store of test samples with a per-class quota, where the sample that is oldest and least
certain goes first. The scores are plain functions (:func:`cstu_score`, :func:`timeliness_weight`), so other methods
can reuse the bank with their own weighting. Samples live in one buffer allocated at the first insertion
(``capacity`` slots of the sample's shape), so a long stream allocates nothing per sample.

Reference: BIT-DA/RoTTA ``core/utils/memory.py`` (class ``CSTU``), commit 67e34c9; the same code is copied into
mariodoebler/test-time-adaptation ``classification/methods/rotta.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


def cstu_score(
    age: float, uncertainty: float, capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0
) -> float:
    """RoTTA's heuristic score of a memory item: the item with the **highest** score is evicted first.

    ``lambda_t / (1 + exp(-age / capacity)) + lambda_u * uncertainty / log(num_classes)``: a sigmoid of the
    normalised age plus the normalised prediction entropy (official ``CSTU.heuristic_score``, in Python floats).

    Args:
        age: number of insertions since the item was stored (0 for a newcomer).
        uncertainty: the entropy of the prediction that labelled the item.
        capacity: the memory capacity ``N``.
        num_classes: ``C`` (at least 2: ``log C`` normalises the entropy).
        lambda_t / lambda_u: weights of the timeliness and uncertainty terms.

    Example:
        >>> from adaptkit.functional.memory import cstu_score
        >>> cstu_score(0, 0.0, 64, 10)  # a certain newcomer: sigmoid(0) = 0.5
        0.5
        >>> round(cstu_score(64, 2.302585, 64, 10), 4)  # age N, uniform entropy over 10 classes: sigmoid(1) + 1
        1.7311
    """
    return lambda_t * 1 / (1 + math.exp(-age / capacity)) + lambda_u * uncertainty / math.log(num_classes)


def timeliness_weight(ages: torch.Tensor) -> torch.Tensor:
    """RoTTA's loss weight of a memory item from its normalised age ``a = age / N``: ``exp(-a) / (1 + exp(-a))``.

    Newer items weigh more (0.5 at age 0, ``sigmoid(-1) = 0.269`` at age ``N``).

    Example:
        >>> import torch
        >>> from adaptkit.functional.memory import timeliness_weight
        >>> [round(v, 4) for v in timeliness_weight(torch.tensor([0.0, 1.0])).tolist()]
        [0.5, 0.2689]
    """
    return torch.exp(-ages) / (1 + torch.exp(-ages))


@dataclass
class MemoryItem:
    """One stored sample: its buffer ``slot``, the ``uncertainty`` it was stored with, and its ``age``."""

    slot: int
    uncertainty: float
    age: int = 0


class MemoryBatch(NamedTuple):
    """The memory's content in class-major order (class 0's items in insertion order, then class 1's, ...).

    Attributes:
        data: ``(n, *sample_shape)``, a new tensor (not a view of the memory's buffer).
        labels: ``(n,)`` int64 pseudo-labels.
        ages: ``(n,)`` float32 normalised ages ``age / capacity`` (official ``CSTU.get_memory``).
    """

    data: torch.Tensor
    labels: torch.Tensor
    ages: torch.Tensor


class CSTUMemory:
    """Category-balanced memory with timeliness and uncertainty (RoTTA's CSTU), reproducing the official rules.

    Inserting a sample of predicted class ``c`` with score ``s = cstu_score(0, uncertainty)``:

    * class ``c`` below its quota ``capacity / num_classes``: stored if the memory is not full; otherwise the
      highest-scoring item of the **majority classes** (the classes holding the most items) is evicted if its
      score is higher than ``s``, else the newcomer is rejected;
    * class ``c`` at its quota: the same test within class ``c`` only.

    Ties between items go to the one visited last (classes in increasing order, items in insertion order), as
    the official ``score >= max_score``. After every insertion attempt, stored or not, every item's age grows by
    one (the newcomer included). The per-class lists keep insertion order; eviction removes from the middle.

    Args:
        capacity: number of samples ``N`` (RoTTA: 64).
        num_classes: ``C`` (at least 2).
        lambda_t / lambda_u: score weights (RoTTA: 1.0 / 1.0).

    Example:
        >>> import torch
        >>> from adaptkit.functional.memory import CSTUMemory
        >>> mem = CSTUMemory(capacity=4, num_classes=2)  # quota: 2 per class
        >>> [mem.add(torch.full((3,), float(i)), label=0, uncertainty=0.0) for i in range(4)]  # the oldest go
        [True, True, True, True]
        >>> mem.class_counts(), mem.get().data[:, 0].tolist(), [it.age for it in mem.items[0]]
        ([2, 0], [2.0, 3.0], [2, 1])
    """

    def __init__(self, capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0) -> None:
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"CSTUMemory: capacity must be a positive integer, got {capacity}")
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(
                f"CSTUMemory: num_classes must be an integer >= 2 (the entropy is normalised by log C), "
                f"got {num_classes}"
            )
        for name, v in (("lambda_t", lambda_t), ("lambda_u", lambda_u)):
            if not math.isfinite(v):
                raise ValueError(f"CSTUMemory: {name} must be a finite number, got {v}")
        self.capacity = int(capacity)
        self.num_classes = int(num_classes)
        self.per_class = self.capacity / self.num_classes
        self.lambda_t = float(lambda_t)
        self.lambda_u = float(lambda_u)
        #: per class, the stored items in insertion order
        self.items: list[list[MemoryItem]] = [[] for _ in range(self.num_classes)]
        self._data: torch.Tensor | None = None
        self._free: list[int] = []

    # ------------------------------------------------------------------ scores
    def score(self, age: float, uncertainty: float) -> float:
        """:func:`cstu_score` with this memory's capacity, class count and weights."""
        return cstu_score(age, uncertainty, self.capacity, self.num_classes, self.lambda_t, self.lambda_u)

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return sum(len(c) for c in self.items)

    def class_counts(self) -> list[int]:
        """Number of stored items per class."""
        return [len(c) for c in self.items]

    def majority_classes(self) -> list[int]:
        """The classes holding the most items, in increasing order."""
        counts = self.class_counts()
        top = max(counts)
        return [c for c, n in enumerate(counts) if n == top]

    @property
    def sample_shape(self) -> torch.Size | None:
        """The shape of one stored sample, or ``None`` before the first insertion."""
        return None if self._data is None else self._data.shape[1:]

    # ------------------------------------------------------------------ insertion
    def add(self, x: torch.Tensor, label: int, uncertainty: float) -> bool:
        """Offer one sample ``x`` (no batch dimension) with its pseudo-label and uncertainty; ages grow afterwards.

        Returns:
            whether the sample was stored (a copy of it: ``x`` is not kept).

        Raises:
            ValueError: ``label`` out of range, or ``x`` of another shape than the stored samples.
        """
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"CSTUMemory: label {label} is out of range for {self.num_classes} classes")
        if self._data is not None and x.shape != self._data.shape[1:]:
            raise ValueError(
                f"CSTUMemory: it holds samples of shape {tuple(self._data.shape[1:])}, got {tuple(x.shape)}; "
                "clear() it first to store samples of another shape"
            )
        stored = self._admit(label, self.score(0, uncertainty))
        if stored:
            if self._data is None:
                self._data = x.detach().new_empty((self.capacity, *x.shape))
                self._free = list(range(self.capacity - 1, -1, -1))
            slot = self._free.pop()
            with torch.no_grad():
                self._data[slot].copy_(x.detach())
            self.items[label].append(MemoryItem(slot, float(uncertainty)))
        self.add_age()
        return stored

    def _admit(self, cls: int, score: float) -> bool:
        """Official ``remove_instance``: make room for a newcomer of class ``cls`` (evicting one item), or refuse."""
        if len(self.items[cls]) < self.per_class:
            if len(self) < self.capacity:
                return True
            return self._evict_from(self.majority_classes(), score)
        return self._evict_from([cls], score)

    def _evict_from(self, classes: list[int], score_base: float) -> bool:
        """Official ``remove_from_classes``: evict the highest-scoring item of ``classes`` if it beats
        ``score_base`` (then the newcomer may enter); with no item in ``classes`` the newcomer enters."""
        best: tuple[int, int] | None = None
        best_score = 0.0
        for cls in classes:
            for idx, item in enumerate(self.items[cls]):
                s = self.score(item.age, item.uncertainty)
                if best is None or s >= best_score:
                    best, best_score = (cls, idx), s
        if best is None:
            return True
        if best_score > score_base:
            item = self.items[best[0]].pop(best[1])
            self._free.append(item.slot)
            return True
        return False

    def add_age(self) -> None:
        """Every stored item grows one insertion older."""
        for class_items in self.items:
            for item in class_items:
                item.age += 1

    # ------------------------------------------------------------------ read-out and state
    def get(self) -> MemoryBatch:
        """The stored samples, pseudo-labels and normalised ages, class-major (see :class:`MemoryBatch`).

        Raises:
            RuntimeError: the memory is empty.
        """
        flat = [(c, it) for c, class_items in enumerate(self.items) for it in class_items]
        if not flat or self._data is None:
            raise RuntimeError("CSTUMemory.get: the memory is empty")
        device = self._data.device
        slots = torch.tensor([it.slot for _, it in flat], dtype=torch.long, device=device)
        labels = torch.tensor([c for c, _ in flat], dtype=torch.long, device=device)
        ages = torch.tensor([it.age / self.capacity for _, it in flat], dtype=torch.float32, device=device)
        return MemoryBatch(self._data.index_select(0, slots), labels, ages)

    def clear(self) -> None:
        """Forget every item and release the sample buffer."""
        self.items = [[] for _ in range(self.num_classes)]
        self._data = None
        self._free = []

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (``torch.load(weights_only=True)`` safe), items in class-major order."""
        flat = [(c, it) for c, class_items in enumerate(self.items) for it in class_items]
        state: dict[str, Any] = {
            "capacity": self.capacity,
            "num_classes": self.num_classes,
            "labels": torch.tensor([c for c, _ in flat], dtype=torch.long),
            "uncertainty": torch.tensor([it.uncertainty for _, it in flat], dtype=torch.float64),
            "age": torch.tensor([it.age for _, it in flat], dtype=torch.long),
        }
        if self._data is not None:
            slots = torch.tensor([it.slot for _, it in flat], dtype=torch.long, device=self._data.device)
            state["data"] = self._data.index_select(0, slots).clone()
        return state

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        """Inverse of :meth:`state_dict` (checked first: capacity and class count must match); ``device``: where
        the samples go (default: where they are in ``state``)."""
        if int(state["capacity"]) != self.capacity or int(state["num_classes"]) != self.num_classes:
            raise ValueError(
                f"CSTUMemory: the state is for capacity {state['capacity']} and {state['num_classes']} classes, "
                f"this memory has {self.capacity} and {self.num_classes}"
            )
        labels, unc, age = state["labels"].tolist(), state["uncertainty"].tolist(), state["age"].tolist()
        data = state.get("data")
        n = len(labels)
        if not (len(unc) == len(age) == n) or n > self.capacity or (n and (data is None or data.shape[0] != n)):
            raise ValueError(f"CSTUMemory: inconsistent state ({n} labels for capacity {self.capacity})")
        if any(not 0 <= c < self.num_classes for c in labels):
            raise ValueError("CSTUMemory: a label in the state is out of range")
        self.clear()
        if data is not None:
            data = data if device is None else data.to(device)
            self._data = data.new_empty((self.capacity, *data.shape[1:]))
            with torch.no_grad():
                self._data[:n].copy_(data)
            self._free = list(range(self.capacity - 1, n - 1, -1))
        for slot, (c, u, a) in enumerate(zip(labels, unc, age)):
            self.items[c].append(MemoryItem(slot, float(u), int(a)))

    def __repr__(self) -> str:
        return f"CSTUMemory(capacity={self.capacity}, num_classes={self.num_classes}, stored={len(self)})"
