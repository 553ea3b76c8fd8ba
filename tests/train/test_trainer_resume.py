"""train_head: head_lr parameter groups, lr schedulers, per-epoch checkpoints and bitwise resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from helpers import small_dropout_cnn

from adaptkit import NCTTTHead, RotationHead
from adaptkit.train import train_head

small_cnn = small_dropout_cnn


def data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def nc_head(shapes: list[tuple[int, ...]]) -> NCTTTHead:
    return NCTTTHead(shapes[0][0], embed_dim=16)


class Crash:
    """Yields ``batches`` on the first ``ok`` passes, then fails as an interrupted run would."""

    def __init__(self, batches: list[Any], ok: int) -> None:
        self.batches, self.ok, self.passes = batches, ok, 0

    def __iter__(self) -> Any:
        self.passes += 1
        if self.passes > self.ok + 1:  # pass 1 is train_head's shape probe (one batch)
            raise KeyboardInterrupt("simulated interruption")
        yield from self.batches


def states(*modules: nn.Module) -> list[torch.Tensor]:
    return [v for m in modules for v in m.state_dict().values()]


def joint_run(model: nn.Module, loader: Any, epochs: int, path: Path | None) -> NCTTTHead:
    return train_head(  # type: ignore[return-value]
        model, "4", nc_head, loader, epochs, joint=True, lr=0.05, head_lr=1e-2, progress=False, checkpoint=path,
        scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3], gamma=0.5),
    )  # fmt: skip


def test_head_lr_gives_the_head_its_own_parameter_group() -> None:
    model = small_cnn()
    seen: list[torch.optim.Optimizer] = []

    def sgd(groups: Any) -> torch.optim.Optimizer:
        seen.append(torch.optim.SGD(groups, lr=0.1, momentum=0.9))
        return seen[0]

    torch.manual_seed(0)  # the head a factory call under the trainer's seed gives
    head = train_head(model, "4", nc_head, data(), 2, joint=True, head_lr=0.0, optimizer=sgd, progress=False)
    torch.manual_seed(0)
    fresh = nc_head([(8, 8, 8)])
    groups = seen[0].param_groups
    assert [g["lr"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()}
    # lr 0 for the head: its weights never move although the model's do
    assert all(torch.equal(a, b) for a, b in zip(head.projector.parameters(), fresh.projector.parameters()))
    assert not torch.equal(model[0].weight, small_cnn()[0].weight)


def test_frozen_mode_head_lr_is_the_learning_rate() -> None:
    seen: list[float] = []

    def adam(params: Any) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(params)
        seen.append(opt.param_groups[0]["lr"])
        return opt

    train_head(small_cnn().eval(), "4", nc_head, data(), 1, head_lr=0.25, optimizer="sgd", progress=False)
    head = train_head(small_cnn().eval(), "4", nc_head, data(), 1, head_lr=0.25, optimizer=adam, progress=False)
    assert seen == [1e-3] and head.history  # a callable builds its own optimizer; "sgd" used 0.25 (no error)


@pytest.mark.parametrize("interval, per_epoch", [("epoch", 1), ("step", 3)])
def test_scheduler_steps_per_epoch_or_per_step(interval: str, per_epoch: int) -> None:
    calls: list[int] = []

    def sched(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: calls.append(i) or 0.5**i)

    train_head(small_cnn().eval(), "4", nc_head, data(3), 2, scheduler=sched, scheduler_interval=interval,
               progress=False)  # fmt: skip
    assert calls == list(range(1 + 2 * per_epoch))  # LambdaLR evaluates once at construction, then per step


def test_resume_after_an_interruption_is_bitwise_the_uninterrupted_run(tmp_path: Path) -> None:
    whole_model = small_cnn()
    torch.manual_seed(11)  # dropout draws from the global generator
    whole = joint_run(whole_model, data(), 4, tmp_path / "whole.pt")

    path = tmp_path / "run.pt"
    crashed = small_cnn()
    torch.manual_seed(11)
    with pytest.raises(KeyboardInterrupt):
        joint_run(crashed, Crash(data(), ok=1), 4, path)
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1 and len(saved["history"]) == 1
    torch.manual_seed(999)  # a restarted script: other global random state, a fresh model
    resumed_model = small_cnn()
    resumed = joint_run(resumed_model, data(), 4, path)  # the lr drop after epoch 3 needs the scheduler

    assert all(torch.equal(a, b) for a, b in zip(states(whole, whole_model), states(resumed, resumed_model)))
    assert resumed.history == whole.history and len(resumed.history) == 4
    assert resumed.binding == whole.binding


def test_finished_checkpoint_skips_training(tmp_path: Path) -> None:
    path = tmp_path / "done.pt"
    model = small_cnn()
    head = joint_run(model, data(), 2, path)
    trained = copy.deepcopy(model.state_dict())
    counting = Crash(data(), ok=0)  # only the shape probe may read it
    again_model = small_cnn()
    again = joint_run(again_model, counting, 2, path)
    assert all(torch.equal(a, b) for a, b in zip(states(head), states(again)))
    assert all(torch.equal(v, trained[k]) for k, v in again_model.state_dict().items())


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    train_head(small_cnn().eval(), "4", nc_head, data(), 1, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="another run"):
        train_head(small_cnn().eval(), "4", lambda s: RotationHead(s[0][0]), data(), 1, checkpoint=path,
                   progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="another run"):
        train_head(small_cnn().eval(), "1", nc_head, data(), 1, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="another run"):  # same class, layer and weight shapes; other noise level
        train_head(small_cnn().eval(), "4", lambda s: NCTTTHead(s[0][0], embed_dim=16, sigma=0.05), data(), 1,
                   checkpoint=path, progress=False)  # fmt: skip
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not an adaptkit training checkpoint"):
        train_head(small_cnn().eval(), "4", nc_head, data(), 1, checkpoint=other, progress=False)


def test_bad_scheduler_interval() -> None:
    with pytest.raises(ValueError, match="scheduler_interval"):
        train_head(small_cnn().eval(), "4", nc_head, data(), 1, scheduler_interval="batch", progress=False)
