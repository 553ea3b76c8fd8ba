"""``TTTPPHead``: the SimCLR projection head of TTT++ plus the stored source feature moments (Liu et al. 2021;
spec ../shared/reference/baselines.md section 10), and ``FeatureQueue``, the FIFO of past target features."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch
import torch.nn as nn

from adaptkit.functional.augment import simclr_augment
from adaptkit.functional.tttpp import coral_loss, feature_moments, mean_discrepancy, nt_xent_loss
from adaptkit.heads.base import AuxHead, as_feature_map

#: the released code's ``SupConLoss`` multiplies NT-Xent by ``temperature / base_temperature`` (0.07)
SUPCON_BASE_TEMPERATURE = 0.07
#: weight of the mean term relative to CORAL (released code: ``MMD_SCALE_FACTOR``)
MEAN_FACTOR = 0.5
#: TTT++'s CIFAR-10 alignment scales (encoder features / projection-head features)
SCALE_ENC, SCALE_PROJ = 0.05, 0.2

Queue = Union[tuple[torch.Tensor, torch.Tensor], None]


class FeatureQueue:
    """A bounded FIFO of feature rows (a ring buffer of ``capacity`` rows, allocated on the first push and freed by
    :meth:`clear`): memory never grows past ``capacity x d``.

    Example:
        >>> import torch
        >>> from adaptkit.heads.tttpp import FeatureQueue
        >>> q = FeatureQueue(3)
        >>> q.push(torch.tensor([[1.0], [2.0]]))
        >>> q.push(torch.tensor([[3.0], [4.0]]))
        >>> q.recent(3).flatten().tolist(), q.recent(1).flatten().tolist(), len(q)
        ([2.0, 3.0, 4.0], [4.0], 3)
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"FeatureQueue: capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.buffer: torch.Tensor | None = None
        self.ptr = 0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        """Append ``(N, d)`` rows (detached), dropping the oldest beyond the capacity."""
        if self.capacity == 0:
            return
        rows = rows.detach()[-self.capacity :]
        n = rows.shape[0]
        if self.buffer is None or self.buffer.shape[1:] != rows.shape[1:] or self.buffer.device != rows.device:
            self.buffer = rows.new_zeros((self.capacity, *rows.shape[1:]))
            self.ptr = self.count = 0
        idx = (self.ptr + torch.arange(n, device=rows.device)) % self.capacity
        self.buffer[idx] = rows.to(self.buffer.dtype)
        self.ptr = (self.ptr + n) % self.capacity
        self.count = min(self.capacity, self.count + n)

    def recent(self, k: int) -> torch.Tensor | None:
        """The ``min(k, len(self))`` most recent rows, oldest first (``None`` when that is none)."""
        k = min(int(k), self.count)
        if k <= 0 or self.buffer is None:
            return None
        idx = (self.ptr - k + torch.arange(k, device=self.buffer.device)) % self.capacity
        return self.buffer[idx]

    def clear(self) -> None:
        """Forget every row and free the buffer."""
        self.buffer = None
        self.ptr = self.count = 0


class _SourceStats:
    """Streaming source moments of one feature level: overall mean / covariance (float64 sums around a shift),
    and the CORAL / mean discrepancy of every later chunk of ``chunk`` rows to the first chunk (the released
    ``offline()`` summary, whose loader batches are queue-sized)."""

    def __init__(self, chunk: int) -> None:
        self.chunk = int(chunk)
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.pending: list[torch.Tensor] = []
        self.pending_n = 0
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None
        self.first_rows: torch.Tensor | None = None
        self.coral: list[float] = []
        self.mean: list[float] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
        assert self.s1 is not None and self.s2 is not None
        c = x - self.shift
        self.n += x.shape[0]
        self.s1 += c.sum(dim=0)
        self.s2 += c.t() @ c
        self.pending.append(x)
        self.pending_n += x.shape[0]
        while self.pending_n >= self.chunk:
            rows = torch.cat(self.pending)
            self.pending = [rows[self.chunk :]] if rows.shape[0] > self.chunk else []
            self.pending_n = rows.shape[0] - self.chunk
            self._chunk(rows[: self.chunk])

    def _chunk(self, rows: torch.Tensor) -> None:
        mu, cov = feature_moments(rows)
        if self.first is None:
            self.first, self.first_rows = (mu, cov), rows
        else:
            self.coral.append(float(coral_loss(self.first[1], cov)))
            self.mean.append(float(mean_discrepancy(self.first[0], mu)))
            self.first_rows = None  # only needed for the small-data fallback

    def finish(self, who: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        if self.n < 4 or self.s1 is None or self.s2 is None or self.shift is None:
            raise ValueError(f"{who}: need at least 4 source samples to store source moments, got {self.n}")
        m1 = self.s1 / self.n
        cov = (self.s2 - self.n * torch.outer(m1, m1)) / (self.n - 1)
        mean = self.shift + m1
        if not self.coral:  # fewer than two full chunks: compare the two halves of the data instead
            rows = torch.cat(([] if self.first_rows is None else [self.first_rows]) + self.pending)
            half = rows.shape[0] // 2
            mu_a, cov_a = feature_moments(rows[:half])
            mu_b, cov_b = feature_moments(rows[half : 2 * half])
            self.coral.append(float(coral_loss(cov_a, cov_b)))
            self.mean.append(float(mean_discrepancy(mu_a, mu_b)))
        d = cov.shape[0]
        # floors relative to the features' own scale: with little or near-constant source data the measured
        # between-batch discrepancy can be ~1e-11, and dividing by it makes the test-time step explode
        coral_floor = REL_FLOOR * float(cov.pow(2).sum()) / (4 * d * d)
        mean_floor = REL_FLOOR * float(cov.diagonal().mean())
        return (
            mean,
            cov,
            _positive(sum(self.coral) / len(self.coral), coral_floor, who),
            _positive(sum(self.mean) / len(self.mean), mean_floor, who),
        )


#: the alignment normalisers are at least this fraction of the source features' own scale
REL_FLOOR = 1e-3


def _positive(v: float, floor: float, who: str) -> float:
    if v == v and v != float("inf") and v >= floor and v > 0:
        return v
    warnings.warn(
        f"{who}: the source features barely vary between batches (average discrepancy {v:.3g}); the alignment "
        f"terms are normalised by {max(floor, 1e-12):.3g} instead (train the head on more source data)",
        stacklevel=3,
    )
    return max(floor, 1e-12) if floor == floor and floor > 0 else 1.0


class TTTPPHead(AuxHead):
    """SimCLR projection head on a layer's globally pooled features, with the source feature moments TTT++
    aligns the test features to.

    Architecture (the released ``SupConResNet`` head): global average pool of the tapped features to ``h``
    ``(B, C)``, then ``z = Linear(C -> hidden) -> ReLU -> Linear(hidden -> proj_dim)``; the contrastive loss
    L2-normalises ``z``, the alignment uses ``h`` and ``z`` as they are (the released "ext" and "ssh" levels).

    * :meth:`prepare` makes two SimCLR views of the batch (:func:`~adaptkit.functional.augment.simclr_augment`)
      and :meth:`train_loss` is NT-Xent between their projections.
    * :meth:`fit_end` (run by the training helper on the source data) stores the mean and covariance of ``h`` and
      ``z`` over the source data, and the average CORAL / mean discrepancy between chunks of ``queue_size``
      source samples (the normalisers of the alignment losses); they are buffers: :meth:`save` keeps them.
    * :meth:`test_loss` adds the scale-normalised alignment of the clean test batch (plus a queue of past test
      features) to NT-Xent.

    Args:
        in_channels: channels ``C`` of the tapped layer.
        proj_dim: projection width (released: 128).
        hidden: hidden width of the MLP; ``None`` = ``in_channels`` (released).
        temperature: NT-Xent temperature (released: 0.5).
        queue_size: target sample size the source normalisers are measured at (released CIFAR-10: 1536, the
            test-time queue size incl. the batch); the method's queue defaults to it.
        crop_scale, flip_p, jitter, jitter_p, grayscale_p, value_range: the views' augmentation (see
            :func:`~adaptkit.functional.augment.simclr_augment`; released: (0.2, 1), 0.5, (0.4, 0.4, 0.4, 0.1),
            0.8, 0.2).

    Example:
        >>> import torch
        >>> from adaptkit.heads.tttpp import TTTPPHead
        >>> head = TTTPPHead(16, proj_dim=8)
        >>> views, n = head.prepare(torch.rand(4, 3, 32, 32), torch.Generator().manual_seed(0))
        >>> views.shape, n, head.train_loss([torch.randn(8, 16, 4, 4)], n).shape
        (torch.Size([8, 3, 32, 32]), 4, torch.Size([]))
    """

    def __init__(
        self,
        in_channels: int,
        proj_dim: int = 128,
        hidden: int | None = None,
        temperature: float = 0.5,
        queue_size: int = 1536,
        crop_scale: Sequence[float] = (0.2, 1.0),
        flip_p: float = 0.5,
        jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        value_range: str | Sequence[float] | None = "auto",
    ) -> None:
        super().__init__()
        hidden = int(hidden or in_channels)
        if temperature <= 0 or int(queue_size) < 2 or int(proj_dim) < 1:
            raise ValueError(
                f"TTTPPHead: need temperature > 0, queue_size >= 2 and proj_dim >= 1, got temperature={temperature}, "
                f"queue_size={queue_size}, proj_dim={proj_dim}"
            )
        if len(jitter) != 4 or len(crop_scale) != 2:
            raise ValueError("TTTPPHead: jitter must be 4 numbers and crop_scale 2 numbers")
        vr = value_range if value_range is None or isinstance(value_range, str) else [float(v) for v in value_range]
        self._remember(
            in_channels=int(in_channels), proj_dim=int(proj_dim), hidden=hidden, temperature=float(temperature),
            queue_size=int(queue_size), crop_scale=[float(v) for v in crop_scale], flip_p=float(flip_p),
            jitter=[float(v) for v in jitter], jitter_p=float(jitter_p), grayscale_p=float(grayscale_p),
            value_range=vr,
        )  # fmt: skip
        self.temperature, self.queue_size = float(temperature), int(queue_size)
        self._augment = {
            "crop_scale": tuple(float(v) for v in crop_scale),
            "flip_p": float(flip_p),
            "jitter": tuple(float(v) for v in jitter),
            "jitter_p": float(jitter_p),
            "grayscale_p": float(grayscale_p),
            "value_range": vr,
        }
        self.projector = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, proj_dim))
        c, p = int(in_channels), int(proj_dim)
        self.register_buffer("src_mean_enc", torch.zeros(c))
        self.register_buffer("src_cov_enc", torch.zeros(c, c))
        self.register_buffer("src_mean_proj", torch.zeros(p))
        self.register_buffer("src_cov_proj", torch.zeros(p, p))
        #: average CORAL / mean discrepancy between source chunks, per level (encoder, projection)
        self.register_buffer("src_coral", torch.ones(2))
        self.register_buffer("src_mean_disc", torch.ones(2))
        #: source samples behind the stored moments (0: not fitted yet)
        self.register_buffer("src_count", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ features
    def embed(self, feats: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, z)``: pooled features ``(B, C)`` and projections ``(B, proj_dim)`` of one layer's features."""
        f = feats if isinstance(feats, torch.Tensor) else feats[0]
        h = as_feature_map(f).mean(dim=(2, 3))
        return h, self.projector(h)

    @property
    def has_source_moments(self) -> bool:
        """Whether :meth:`fit_end` stored source moments (the head was trained with the training helper)."""
        return bool(self.src_count.item() > 0)

    # ------------------------------------------------------------------ auxiliary task
    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Two SimCLR views of every sample, ``(2B, C, H, W)`` (view 1 then view 2), and ``B``."""
        v1 = simclr_augment(x, generator, **self._augment)
        v2 = simclr_augment(x, generator, **self._augment)
        return torch.cat([v1, v2]), x.shape[0]

    def train_loss(
        self, feats: Sequence[torch.Tensor], targets: Any = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """NT-Xent between the projections of the two views (features of :meth:`prepare`'s ``2B`` batch)."""
        f = feats[0]
        n = f.shape[0] // 2 if targets is None else int(targets)
        if f.shape[0] != 2 * n:
            raise ValueError(f"TTTPPHead.train_loss: expected features of 2 x {n} views, got {f.shape[0]} rows")
        _, z = self.embed(f)
        return nt_xent_loss(z[:n], z[n:], self.temperature)

    def alignment_loss(
        self,
        h: torch.Tensor,
        z: torch.Tensor,
        queue: Queue = None,
        scale_enc: float = SCALE_ENC,
        scale_proj: float = SCALE_PROJ,
    ) -> torch.Tensor:
        """TTT++'s feature alignment of target features to the stored source moments, at both levels:

        ``scale * (CORAL(S_s, S_t) / coral_src + 0.5 * mean_disc(mu_s, mu_t) / mean_disc_src)``

        with the target moments ``mu_t``, ``S_t`` over the rows of ``h`` (resp. ``z``) followed by the queued
        rows (``queue = (h_past, z_past)``, detached), and ``coral_src``, ``mean_disc_src`` the average
        discrepancies between source chunks (:meth:`fit_end`). A level with scale 0 is skipped.
        """
        if not self.has_source_moments:
            raise ValueError(
                "TTTPPHead: this head has no source moments; train it with adaptkit.TTTPlusPlus.train_head(model, "
                "layer=..., loader=...) (which calls fit_end on the source data), or call head.fit_end(...)"
            )
        total = h.new_zeros(())
        levels = (
            (h, None if queue is None else queue[0], self.src_mean_enc, self.src_cov_enc, 0, scale_enc),
            (z, None if queue is None else queue[1], self.src_mean_proj, self.src_cov_proj, 1, scale_proj),
        )
        for rows, past, mu_s, cov_s, i, scale in levels:
            if scale == 0:
                continue
            if past is not None:
                rows = torch.cat([rows, past.to(rows.dtype)])
            mu_t, cov_t = feature_moments(rows)
            coral = coral_loss(cov_s.to(rows.dtype), cov_t) / self.src_coral[i]
            mean = mean_discrepancy(mu_s.to(rows.dtype), mu_t) / self.src_mean_disc[i]
            total = total + scale * (coral + MEAN_FACTOR * mean)
        return total

    def test_loss(
        self,
        feats: Sequence[torch.Tensor],
        targets: Any,
        generator: torch.Generator | None = None,
        *,
        queue: Queue = None,
        ssl_weight: float | None = None,
        scale_enc: float = SCALE_ENC,
        scale_proj: float = SCALE_PROJ,
    ) -> torch.Tensor:
        """TTT++'s test loss on features of ``[view 1, view 2, clean batch]`` (``3B`` rows, ``targets = B``):

        ``ssl_weight * NT-Xent(views) + alignment_loss(clean rows, queue)``.

        ``ssl_weight`` defaults to the released ``temperature / 0.07`` (SupConLoss's ``base_temperature``).
        """
        f = feats[0]
        n = int(targets)
        if f.shape[0] != 3 * n:
            raise ValueError(
                f"TTTPPHead.test_loss: expected features of the two views and the clean batch (3 x {n} rows), got "
                f"{f.shape[0]}; adaptkit.TTTPlusPlus builds them"
            )
        h, z = self.embed(f)
        w = self.temperature / SUPCON_BASE_TEMPERATURE if ssl_weight is None else float(ssl_weight)
        loss = w * nt_xent_loss(z[:n], z[n : 2 * n], self.temperature) if w else h.new_zeros(())
        return loss + self.alignment_loss(h[2 * n :], z[2 * n :], queue, scale_enc, scale_proj)

    # ------------------------------------------------------------------ source side
    @torch.no_grad()
    def fit_end(self, feats_iter: Iterable[Sequence[torch.Tensor]]) -> None:
        """Store the source moments of the pooled features and projections over ``feats_iter`` (lists of tapped
        source features, one per batch; the training helper passes the training loader, model and head in eval
        mode), plus the average CORAL / mean discrepancy between chunks of ``queue_size`` samples and the first
        chunk (the released ``offline()`` summary). With fewer than ``2 * queue_size`` samples, the two halves
        of the data are compared instead (smaller chunks: larger normalisers, so weaker alignment)."""
        who = f"{type(self).__name__}.fit_end"
        stats = (_SourceStats(self.queue_size), _SourceStats(self.queue_size))
        for feats in feats_iter:
            h, z = self.embed(feats)
            stats[0].add(h)
            stats[1].add(z)
        enc, proj = stats[0].finish(who), stats[1].finish(who)
        for (mean, cov, coral, disc), mu_buf, cov_buf, i in (
            (enc, self.src_mean_enc, self.src_cov_enc, 0),
            (proj, self.src_mean_proj, self.src_cov_proj, 1),
        ):
            mu_buf.copy_(mean)
            cov_buf.copy_(cov)
            self.src_coral[i] = coral
            self.src_mean_disc[i] = disc
        self.src_count.fill_(stats[0].n)
