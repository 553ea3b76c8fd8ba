"""Stream protocols: order, resets, seeding, non-i.i.d. labels."""

from __future__ import annotations

import pytest
import torch

from adaptkit.data.streams import (
    Domain,
    continual,
    dirichlet_order,
    gradual,
    make_stream,
    mixed_domains,
    reset_each_shift,
)


def _domains(k: int = 3, n: int = 10) -> list[Domain]:
    return [
        Domain(f"d{i}", torch.full((n, 1, 2, 2), i, dtype=torch.uint8), torch.arange(n) % 2, "c", i + 1)
        for i in range(k)
    ]


def test_reset_each_shift_resets_at_every_domain() -> None:
    bs = list(reset_each_shift(_domains(), batch_size=4))
    assert [b.domain for b in bs if b.reset] == ["d0", "d1", "d2"]
    assert sum(len(b.y) for b in bs) == 30
    assert all(b.x.dtype == torch.float32 for b in bs)
    assert all(abs(float(b.x.max()) - int(b.domain[1]) / 255.0) < 1e-7 for b in bs)


def test_continual_resets_once() -> None:
    bs = list(continual(_domains(), batch_size=4))
    assert [b.reset for b in bs].count(True) == 1 and bs[0].reset
    assert [b.domain for b in bs][-1] == "d2"


def test_batch_size_one() -> None:
    bs = list(continual(_domains(2, 3), batch_size=1))
    assert len(bs) == 6 and all(len(b.y) == 1 for b in bs)


def test_gradual_goes_up_and_down() -> None:
    doms = _domains(3, 2)
    seq = [b.domain for b in gradual(doms, batch_size=2)]
    assert seq == ["d0", "d1", "d2", "d1", "d0"]


def test_mixed_domains_shuffles_and_is_seeded() -> None:
    a = [b.index.tolist() for b in mixed_domains(_domains(), batch_size=5, seed=3)]
    b = [b.index.tolist() for b in mixed_domains(_domains(), batch_size=5, seed=3)]
    c = [b.index.tolist() for b in mixed_domains(_domains(), batch_size=5, seed=4)]
    assert a == b and a != c
    assert sorted(i for batch in a for i in batch) == list(range(30))


def test_shuffle_is_seeded_and_covers_everything() -> None:
    a = [b.index.tolist() for b in reset_each_shift(_domains(1, 20), 6, shuffle=True, seed=0)]
    b = [b.index.tolist() for b in reset_each_shift(_domains(1, 20), 6, shuffle=True, seed=0)]
    flat = [i for batch in a for i in batch]
    assert a == b and sorted(flat) == list(range(20)) and flat != list(range(20))


def test_dirichlet_small_alpha_gives_long_label_runs() -> None:
    y = torch.arange(10).repeat_interleave(50)
    y = y[torch.randperm(500, generator=torch.Generator().manual_seed(0))]

    def switches(order: torch.Tensor) -> int:
        lab = y[order]
        return int((lab[1:] != lab[:-1]).sum())

    low, high = dirichlet_order(y, 0.01, seed=0), dirichlet_order(y, 100.0, seed=0)
    assert sorted(low.tolist()) == list(range(500)) and sorted(high.tolist()) == list(range(500))
    assert switches(low) < 0.3 * switches(high)
    assert torch.equal(dirichlet_order(y, 0.1, seed=5), dirichlet_order(y, 0.1, seed=5))
    with pytest.raises(ValueError):
        dirichlet_order(y, 0.0)


def test_make_stream_and_errors() -> None:
    assert len(list(make_stream("continual", _domains(), 10))) == 3
    assert len(list(make_stream("mixed", _domains(), 10, dirichlet=0.1))) == 3
    with pytest.raises(ValueError, match="protocol"):
        make_stream("bogus", _domains())
    with pytest.raises(ValueError, match="batch_size"):
        list(continual(_domains(), batch_size=0))
    with pytest.raises(ValueError, match="labels"):
        Domain("x", torch.zeros(2, 1), torch.zeros(3))
