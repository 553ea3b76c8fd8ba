"""Test streams: the order in which shifted data reaches an adapting model, and where resets happen.

A *domain* is one shifted test set (a corruption at a severity). A stream turns domains into batches
and marks where a protocol resets the model:

* :func:`reset_each_shift` - each domain on its own, reset at every domain boundary (Tent's CIFAR-10-C table);
* :func:`continual` - all domains in sequence, never reset;
* :func:`gradual` - one corruption with severities rising and falling (1,2,...,5,...,1), no reset;
* :func:`mixed_domains` - samples of all domains shuffled together, no reset;
* any of them with ``dirichlet=alpha``: non-i.i.d. labels, each domain re-ordered by a Dirichlet
  label-sorted schedule (small ``alpha``: long runs of one class; the RoTTA / LAME protocol).

Every stream is seeded and deterministic.

Example:
    >>> import torch
    >>> from adaptkit.data.streams import Domain, reset_each_shift
    >>> d = [Domain("a", torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.long)),
    ...      Domain("b", torch.ones(3, 1, 2, 2), torch.ones(3, dtype=torch.long))]
    >>> [(b.domain, len(b.y), b.reset) for b in reset_each_shift(d, batch_size=4)]
    [('a', 4, True), ('a', 1, False), ('b', 3, True)]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from adaptkit.data.datasets import as_unit_float


@dataclass(frozen=True)
class Domain:
    """One shifted test set held as tensors.

    Attributes:
        name: e.g. ``"gaussian_noise-5"``.
        x: images ``(N, C, H, W)`` (float in ``[0, 1]`` or uint8, converted per batch).
        y: labels ``(N,)`` (class indices, or ``(N, H, W)`` masks for segmentation).
        corruption / severity: what produced it (informational).
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    corruption: str = ""
    severity: int = 0

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"domain {self.name!r}: {len(self.x)} images but {len(self.y)} labels")


@dataclass(frozen=True)
class Batch:
    """A stream item: ``reset`` is True where the protocol resets the model *before* this batch."""

    x: torch.Tensor
    y: torch.Tensor
    domain: str
    reset: bool = False
    index: torch.Tensor | None = None


def dirichlet_order(labels: torch.Tensor, alpha: float, seed: int = 0, slots: int | None = None) -> torch.Tensor:
    """A non-i.i.d. ordering of ``labels`` (class-index tensor) from a Dirichlet schedule.

    The stream is cut into ``slots`` time slots (default: ``10 * num_classes``); each class spreads its
    samples over the slots with proportions drawn from ``Dirichlet(alpha)``; slots are then concatenated.
    ``alpha -> 0`` gives class-sorted runs, large ``alpha`` approaches i.i.d. (RoTTA's protocol).

    Example:
        >>> import torch
        >>> from adaptkit.data.streams import dirichlet_order
        >>> y = torch.arange(4).repeat_interleave(25)
        >>> order = dirichlet_order(y, alpha=0.01, seed=0)
        >>> sorted(order.tolist()) == list(range(100))
        True
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique().tolist()
    slots = slots or 10 * len(classes)
    conc = torch.full((slots,), float(alpha), dtype=torch.float64)
    buckets: list[list[int]] = [[] for _ in range(slots)]
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        gammas = torch._standard_gamma(conc, generator=gen)  # Dirichlet = normalised Gammas, seeded
        props = gammas / gammas.sum() if gammas.sum() > 0 else torch.full_like(conc, 1.0 / slots)
        cuts = (props.cumsum(0) * len(idx)).round().long().clamp(max=len(idx))
        start = 0
        for s in range(slots):
            buckets[s].extend(idx[start : int(cuts[s])].tolist())
            start = int(cuts[s])
        buckets[-1].extend(idx[start:].tolist())
    out = []
    for b in buckets:
        b_t = torch.tensor(b, dtype=torch.long)
        out.append(b_t[torch.randperm(len(b_t), generator=gen)])
    return torch.cat(out)


def _order(d: Domain, shuffle: bool, dirichlet: float | None, gen: torch.Generator, seed: int) -> torch.Tensor:
    if dirichlet is not None:
        return dirichlet_order(d.y if d.y.dim() == 1 else d.y.flatten(1).mode(1).values, dirichlet, seed)
    return torch.randperm(len(d.y), generator=gen) if shuffle else torch.arange(len(d.y))


def _batches(d: Domain, order: torch.Tensor, batch_size: int, reset_first: bool) -> Iterator[Batch]:
    for k, lo in enumerate(range(0, len(order), batch_size)):
        idx = order[lo : lo + batch_size]
        yield Batch(as_unit_float(d.x[idx]), d.y[idx], d.name, reset_first and k == 0, idx)


def _check(domains: Sequence[Domain], batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not domains:
        raise ValueError("a stream needs at least one domain")


def _sequence(
    domains: Sequence[Domain], batch_size: int, shuffle: bool, seed: int, dirichlet: float | None, every: bool
) -> Iterator[Batch]:
    _check(domains, batch_size)
    gen = torch.Generator().manual_seed(seed)
    for k, d in enumerate(domains):
        yield from _batches(d, _order(d, shuffle, dirichlet, gen, seed), batch_size, every or k == 0)


def reset_each_shift(
    domains: Sequence[Domain],
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    dirichlet: float | None = None,
) -> Iterator[Batch]:
    """Each domain in turn; the model is reset before the first batch of every domain."""
    return _sequence(domains, batch_size, shuffle, seed, dirichlet, every=True)


def continual(
    domains: Sequence[Domain],
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    dirichlet: float | None = None,
) -> Iterator[Batch]:
    """All domains in sequence with a single reset at the very start (continual TTA)."""
    return _sequence(domains, batch_size, shuffle, seed, dirichlet, every=False)


def gradual(
    domains_by_severity: Sequence[Domain],
    batch_size: int = 64,
    seed: int = 0,
    shuffle: bool = False,
    dirichlet: float | None = None,
) -> Iterator[Batch]:
    """One corruption at rising then falling severity: ``domains_by_severity`` in order 1..5, streamed as
    1, 2, ..., 5, ..., 2, 1 with no reset (the GTTA / gradual protocol)."""
    seq = list(domains_by_severity) + list(domains_by_severity)[-2::-1]
    yield from continual(seq, batch_size, shuffle, seed, dirichlet)


def mixed_domains(
    domains: Sequence[Domain], batch_size: int = 64, seed: int = 0, dirichlet: float | None = None
) -> Iterator[Batch]:
    """Samples of all domains shuffled together (each batch mixes shifts); one reset at the start."""
    _check(domains, batch_size)
    xs = torch.cat([as_unit_float(d.x) for d in domains])
    ys = torch.cat([d.y for d in domains])
    names = [d.name for d in domains for _ in range(len(d.y))]
    gen = torch.Generator().manual_seed(seed)
    if dirichlet is not None:
        order = dirichlet_order(ys if ys.dim() == 1 else ys.flatten(1).mode(1).values, dirichlet, seed)
    else:
        order = torch.randperm(len(ys), generator=gen)
    for k, lo in enumerate(range(0, len(order), batch_size)):
        idx = order[lo : lo + batch_size]
        yield Batch(
            xs[idx], ys[idx], "mixed" if len({names[i] for i in idx.tolist()}) > 1 else names[int(idx[0])], k == 0, idx
        )


PROTOCOLS = {
    "reset_each_shift": reset_each_shift,
    "continual": continual,
    "gradual": gradual,
    "mixed": mixed_domains,
}


def make_stream(
    protocol: str,
    domains: Sequence[Domain],
    batch_size: int = 64,
    seed: int = 0,
    dirichlet: float | None = None,
    shuffle: bool = True,
) -> Iterator[Batch]:
    """Build a stream by protocol name (``reset_each_shift``, ``continual``, ``gradual``, ``mixed``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    if protocol == "mixed":
        return mixed_domains(domains, batch_size, seed, dirichlet)
    return PROTOCOLS[protocol](domains, batch_size, shuffle=shuffle, seed=seed, dirichlet=dirichlet)
