"""RoTTA's CSTU memory bank: scores against hand-computed values, the eviction rules scenario by scenario, ages, and
a long random stream against a line-by-line transcription of the official ``CSTU`` (BIT-DA/RoTTA
``core/utils/memory.py``, commit 67e34c9)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from adaptkit.functional.memory import CSTUMemory, cstu_score, timeliness_weight


# ---------------------------------------------------------------------------------------------- official transcription
class _Item:
    def __init__(self, data: torch.Tensor, uncertainty: float, age: int = 0) -> None:
        self.data, self.uncertainty, self.age = data, uncertainty, age


class OfficialCSTU:
    """BIT-DA/RoTTA ``CSTU``, transcribed (lists of items, Python floats)."""

    def __init__(self, capacity: int, num_class: int, lambda_t: float = 1.0, lambda_u: float = 1.0) -> None:
        self.capacity, self.num_class = capacity, num_class
        self.per_class = capacity / num_class
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.data: list[list[_Item]] = [[] for _ in range(num_class)]

    def heuristic_score(self, age: float, uncertainty: float) -> float:
        return self.lambda_t * 1 / (1 + math.exp(-age / self.capacity)) + self.lambda_u * uncertainty / math.log(
            self.num_class
        )

    def add_instance(self, x: torch.Tensor, prediction: int, uncertainty: float) -> None:
        new_item = _Item(x, uncertainty, 0)
        if self.remove_instance(prediction, self.heuristic_score(0, uncertainty)):
            self.data[prediction].append(new_item)
        for class_list in self.data:
            for item in class_list:
                item.age += 1

    def remove_instance(self, cls: int, score: float) -> bool:
        occupancy = sum(len(c) for c in self.data)
        if len(self.data[cls]) < self.per_class:
            if occupancy < self.capacity:
                return True
            dist = [len(c) for c in self.data]
            majority = [i for i, n in enumerate(dist) if n == max(dist)]
            return self.remove_from_classes(majority, score)
        return self.remove_from_classes([cls], score)

    def remove_from_classes(self, classes: list[int], score_base: float) -> bool:
        max_class = max_index = max_score = None
        for cls in classes:
            for idx, item in enumerate(self.data[cls]):
                score = self.heuristic_score(item.age, item.uncertainty)
                if max_score is None or score >= max_score:
                    max_score, max_index, max_class = score, idx, cls
        if max_class is not None:
            if max_score > score_base:  # type: ignore[operator]
                self.data[max_class].pop(max_index)  # type: ignore[arg-type]
                return True
            return False
        return True

    def get_memory(self) -> tuple[list[torch.Tensor], list[float]]:
        data = [it.data for c in self.data for it in c]
        ages = [it.age / self.capacity for c in self.data for it in c]
        return data, ages


def _x(v: float) -> torch.Tensor:
    return torch.full((2,), float(v))


def _contents(mem: CSTUMemory) -> list[list[tuple[float, float, int]]]:
    """Per class: (sample id, uncertainty, age) in stored order."""
    if len(mem) == 0:
        return [[] for _ in mem.items]
    data = mem.get().data
    out, k = [], 0
    for class_items in mem.items:
        row = []
        for it in class_items:
            row.append((float(data[k, 0]), it.uncertainty, it.age))
            k += 1
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- scores
def test_score_hand_values() -> None:
    # sigmoid(0) = 0.5; sigmoid(1) = 0.7310585786300049; entropy ln C normalises to 1
    assert cstu_score(0, 0.0, 64, 10) == 0.5
    assert cstu_score(64, 0.0, 64, 10) == pytest.approx(0.7310585786300049, abs=1e-15)
    assert cstu_score(0, math.log(10), 64, 10) == pytest.approx(1.5, abs=1e-15)
    assert cstu_score(32, 0.3, 64, 5, lambda_t=2.0, lambda_u=3.0) == pytest.approx(
        2.0 / (1.0 + math.exp(-0.5)) + 3.0 * 0.3 / math.log(5), abs=1e-15
    )
    mem = CSTUMemory(8, 4, lambda_t=0.5, lambda_u=2.0)
    assert mem.score(4, 0.1) == pytest.approx(0.5 / (1 + math.exp(-0.5)) + 2.0 * 0.1 / math.log(4), abs=1e-15)


def test_timeliness_weight_hand_values() -> None:
    a = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    want = torch.tensor([0.5, 1 / (1 + math.exp(0.5)), 1 / (1 + math.e), 1 / (1 + math.exp(3.0))], dtype=torch.float64)
    torch.testing.assert_close(timeliness_weight(a), want, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------- scenarios
def test_under_quota_and_not_full_stores_and_ages() -> None:
    mem = CSTUMemory(capacity=6, num_classes=3)  # quota 2
    assert mem.add(_x(0), 0, 0.2) is True
    assert [it.age for it in mem.items[0]] == [1]  # the newcomer itself ages after its insertion
    assert mem.add(_x(1), 1, 0.1) is True
    assert mem.add(_x(2), 0, 0.3) is True
    assert _contents(mem) == [[(0.0, 0.2, 3), (2.0, 0.3, 1)], [(1.0, 0.1, 2)], []]
    assert mem.class_counts() == [2, 1, 0] and len(mem) == 3


def test_class_at_quota_evicts_its_highest_score_item() -> None:
    mem = CSTUMemory(capacity=6, num_classes=3)  # quota 2
    mem.add(_x(0), 0, 0.9)  # uncertain: after its insertion, age 1: score sigmoid(1/6) + 0.9/ln 3
    mem.add(_x(1), 0, 0.1)
    mem.add(_x(2), 1, 0.0)
    # class 0 full; newcomer score 0.5 + 0.2/ln3 = 0.682; item 0: sigmoid(3/6)+0.9/ln3 = 1.441 (evicted),
    # item 1: sigmoid(2/6) + 0.1/ln3 = 0.674 (kept: not the highest)
    assert mem.add(_x(3), 0, 0.2) is True
    assert _contents(mem) == [[(1.0, 0.1, 3), (3.0, 0.2, 1)], [(2.0, 0.0, 2)], []]


def test_class_at_quota_rejects_a_worse_newcomer_and_still_ages() -> None:
    mem = CSTUMemory(capacity=6, num_classes=3)
    mem.add(_x(0), 0, 0.0)
    mem.add(_x(1), 0, 0.0)
    # class 0 full with certain items (scores sigmoid(2/6)=0.583, sigmoid(1/6)=0.542); an uncertain newcomer
    # (0.5 + 1.0/ln 3 = 1.41) does not beat them: rejected, the others age anyway
    assert mem.add(_x(2), 0, 1.0) is False
    assert _contents(mem) == [[(0.0, 0.0, 3), (1.0, 0.0, 2)], [], []]
    # an equal score is not enough (strict >): an item of age 0 and uncertainty 0 scores 0.5, as a certain newcomer
    state = mem.state_dict()
    state["age"] = torch.tensor([0, 0])
    mem.load_state_dict(state)
    assert mem.add(_x(3), 0, 0.0) is False
    assert _contents(mem) == [[(0.0, 0.0, 1), (1.0, 0.0, 1)], [], []]


def test_full_memory_evicts_from_the_majority_classes_only() -> None:
    mem = CSTUMemory(capacity=4, num_classes=4)  # quota 1
    mem2 = CSTUMemory(capacity=5, num_classes=2)  # quota 2.5
    mem.add(_x(0), 0, 0.0)
    mem.add(_x(1), 1, 2.0)  # very uncertain, but class 1 is no majority class later
    mem.add(_x(2), 2, 0.0)
    mem.add(_x(3), 3, 0.0)
    assert mem.class_counts() == [1, 1, 1, 1]
    # memory full, class 3 at quota: compete within class 3 (item age 1: 0.5625 > newcomer 0.5): evicted
    assert mem.add(_x(4), 3, 0.0) is True
    assert _contents(mem)[3] == [(4.0, 0.0, 1)]
    # a scenario with a real majority: capacity 5, 2 classes (quota 2.5)
    for i, (c, u) in enumerate([(0, 0.0), (0, 0.0), (0, 0.0), (1, 0.6), (1, 0.0)]):
        assert mem2.add(_x(10 + i), c, u)
    assert mem2.class_counts() == [3, 2]
    # class 1 below quota (2 < 2.5), memory full: evict from the majority class 0 only. Class 1's uncertain item
    # (score sigmoid(2/5) + 0.6/ln2 = 1.46) is higher than anything in class 0, but class 0 is the majority:
    # class 0's oldest (age 5: 0.731) goes
    assert mem2.add(_x(20), 1, 0.0) is True
    assert _contents(mem2) == [
        [(11.0, 0.0, 5), (12.0, 0.0, 4)],
        [(13.0, 0.6, 3), (14.0, 0.0, 2), (20.0, 0.0, 1)],
    ]
    # now class 1 holds 3 >= 2.5: competes within class 1, where the uncertain item goes
    assert mem2.add(_x(21), 1, 0.0) is True
    assert [r[0] for r in _contents(mem2)[1]] == [14.0, 20.0, 21.0]


def test_full_memory_newcomer_rejected_when_the_majority_is_better() -> None:
    mem = CSTUMemory(capacity=5, num_classes=2)  # quota 2.5
    for i, c in enumerate([0, 0, 0, 1, 1]):
        mem.add(_x(i), c, 0.0)
    # full; class 1 below quota: the majority class 0's best item (age 5: sigmoid(1) = 0.731) does not beat an
    # uncertain newcomer (0.5 + 0.5 / ln 2 = 1.22): rejected, nothing evicted, everything ages
    assert mem.add(_x(9), 1, 0.5) is False
    assert _contents(mem) == [[(0.0, 0.0, 6), (1.0, 0.0, 5), (2.0, 0.0, 4)], [(3.0, 0.0, 3), (4.0, 0.0, 2)]]


def test_ties_go_to_the_last_item_visited() -> None:
    # a tie in both age and uncertainty needs equal ages: build one by loading a state
    mem2 = CSTUMemory(capacity=4, num_classes=2)  # quota 2
    mem2.load_state_dict(
        {
            "capacity": 4,
            "num_classes": 2,
            "labels": torch.tensor([0, 0, 1]),
            "uncertainty": torch.tensor([0.1, 0.1, 0.0], dtype=torch.float64),
            "age": torch.tensor([7, 7, 1]),
            "data": torch.stack([_x(0), _x(1), _x(2)]),
        }
    )
    # class 0 at quota: its two items tie; the later one (sample 1) is evicted
    assert mem2.add(_x(3), 0, 0.0) is True
    assert [r[0] for r in _contents(mem2)[0]] == [0.0, 3.0]


def test_memory_smaller_than_the_class_count() -> None:
    mem = CSTUMemory(capacity=2, num_classes=5)  # quota 0.4: a class holds at most one item
    assert mem.add(_x(0), 0, 0.0) and mem.add(_x(1), 1, 0.0)
    assert mem.add(_x(2), 2, 0.0) is True  # full: evicts from the majority classes {0, 1}: the oldest (class 0)
    assert mem.class_counts() == [0, 1, 1, 0, 0]


def test_get_is_class_major_with_normalised_ages_and_copies() -> None:
    mem = CSTUMemory(capacity=8, num_classes=3)
    src = [_x(i) for i in range(4)]
    for v, c in zip(src, [2, 0, 2, 1]):
        mem.add(v, c, 0.0)
    src[1].fill_(99.0)  # the memory keeps a copy
    batch = mem.get()
    assert batch.data[:, 0].tolist() == [1.0, 3.0, 0.0, 2.0]
    assert batch.labels.tolist() == [0, 1, 2, 2]
    assert batch.ages.dtype == torch.float32
    torch.testing.assert_close(batch.ages, torch.tensor([3 / 8, 1 / 8, 4 / 8, 2 / 8]))
    batch.data.zero_()  # not a view of the buffer
    assert mem.get().data[:, 0].tolist() == [1.0, 3.0, 0.0, 2.0]


def test_random_stream_matches_the_official_cstu() -> None:
    rng = random.Random(0)
    for capacity, classes, lt, lu in [(64, 10, 1.0, 1.0), (16, 3, 0.5, 2.0), (7, 4, 1.0, 0.2)]:
        ours, ref = CSTUMemory(capacity, classes, lt, lu), OfficialCSTU(capacity, classes, lt, lu)
        weights = [rng.random() ** 3 for _ in range(classes)]  # imbalanced, class-correlated stream
        for i in range(600):
            c = rng.choices(range(classes), weights)[0]
            u = rng.random() * math.log(classes) if rng.random() < 0.9 else 0.0
            x = torch.tensor([float(i), float(c)])
            ours.add(x, c, u)
            ref.add_instance(x, c, u)
            if i % 50 == 0 or i == 599:
                data, ages = ref.get_memory()
                got = ours.get()
                assert got.data[:, 0].tolist() == [float(d[0]) for d in data]
                torch.testing.assert_close(got.ages, torch.tensor(ages).float(), rtol=0, atol=0)
                assert [len(c) for c in ref.data] == ours.class_counts()


# ---------------------------------------------------------------------------------------------- state and errors
def test_state_round_trip_replays_the_same_decisions() -> None:
    rng = random.Random(1)
    a = CSTUMemory(12, 3)
    stream = [(torch.randn(3, 4, 4), rng.randrange(3), rng.random()) for _ in range(40)]
    for x, c, u in stream[:25]:
        a.add(x, c, u)
    state = a.state_dict()
    b = CSTUMemory(12, 3)
    b.add(torch.zeros(3, 4, 4), 0, 0.0)  # something else first: loading replaces it
    b.load_state_dict(state)
    for x, c, u in stream[25:]:
        assert a.add(x, c, u) == b.add(x, c, u)
    assert torch.equal(a.get().data, b.get().data) and torch.equal(a.get().ages, b.get().ages)

    def rows(m: CSTUMemory) -> list[list[tuple[float, int]]]:
        return [[(i.uncertainty, i.age) for i in r] for r in m.items]

    assert rows(a) == rows(b)


def test_clear_and_errors() -> None:
    mem = CSTUMemory(4, 2)
    mem.add(torch.zeros(3, 2, 2), 1, 0.1)
    with pytest.raises(ValueError, match="shape"):
        mem.add(torch.zeros(3, 4, 4), 1, 0.1)
    with pytest.raises(ValueError, match="out of range"):
        mem.add(torch.zeros(3, 2, 2), 2, 0.1)
    mem.clear()
    assert len(mem) == 0 and mem.sample_shape is None
    with pytest.raises(RuntimeError, match="empty"):
        mem.get()
    mem.add(torch.zeros(3, 4, 4), 1, 0.1)  # another shape after clear()
    assert mem.sample_shape == (3, 4, 4)
    with pytest.raises(ValueError, match="capacity"):
        CSTUMemory(0, 2)
    with pytest.raises(ValueError, match="num_classes"):
        CSTUMemory(4, 1)
    with pytest.raises(ValueError, match="lambda_u"):
        CSTUMemory(4, 2, lambda_u=float("nan"))
    with pytest.raises(ValueError, match="capacity 4 and 2 classes"):
        CSTUMemory(8, 2).load_state_dict(mem.state_dict())
