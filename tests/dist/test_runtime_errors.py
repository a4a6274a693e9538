"""A rank whose step loop raises while its peer trains on: the error leaves that rank at once,
not after a collective its peer never joins (which would hold it until the group's timeout)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from ssl_dist.dist import collectives
from ssl_dist.dist.spawn import WorldError, run_world
from ssl_dist.train.runtime import Hook, Position, Schedule, TorchBackend, run_steps

pytestmark = pytest.mark.dist

TIMEOUT_S = 60.0
"""The world's time and its process-group timeout: a rank held in a collective waits this long."""


class _Agree(Hook):
    """A collective every step, like the worker's stop agreement."""

    def should_stop(self, state):
        collectives.all_reduce_max(torch.zeros(1))
        return None


class _FailOnRankZero(Hook):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def after_step(self, state, out):
        if self.rank == 0 and out.step == 2:
            raise RuntimeError("deliberate failure on rank 0")


class _Report(Hook):
    """A collective at the end of the run, like the worker's data report."""

    def after_run(self, state):
        collectives.all_gather_no_grad(torch.zeros(1, 5))


def _train(rank: int, world_size: int) -> int:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4)

    def inputs(batch, seed):
        return x, y

    class Task(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x, y):
            return (self.model(x).squeeze(1) - y).pow(2).mean(), {}

    task = Task()
    backend = TorchBackend(task, torch.optim.SGD(task.parameters(), lr=0.1))
    hooks = [_Agree(), _FailOnRankZero(rank), _Report()]
    state = run_steps(
        backend,
        inputs,
        lambda epoch: [None] * 4,
        Schedule(10, 0.1),
        Position(),
        hooks,
        images_of=lambda batch: 4,
    )
    return state.step


def test_the_failing_rank_raises_its_own_error_without_waiting_for_its_peer() -> None:
    start = time.monotonic()
    with pytest.raises(WorldError) as info:
        run_world(_train, 2, timeout=TIMEOUT_S)
    elapsed = time.monotonic() - start
    # Rank 0's own error is the last thing it raised (not a collective's error after it), and
    # it came well before the group's timeout: rank 1 was stopped after it, not the other way.
    assert info.value.failures[0].strip().splitlines()[-1] == (
        "RuntimeError: deliberate failure on rank 0"
    ), info.value.failures[0]
    assert "During handling" not in info.value.failures[0]
    assert elapsed < TIMEOUT_S / 2, elapsed
