"""The one step loop: accumulation, schedule, stops, resume position and hook order, against a
hand-written loop on a small regression task."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from ssl_dist.optim import lr_at
from ssl_dist.train.runtime import (
    Hook,
    PhaseClock,
    Position,
    Recorder,
    Schedule,
    TorchBackend,
    run_steps,
)

pytestmark = pytest.mark.unit


@dataclass
class Batch:
    x: Tensor
    y: Tensor


class Regression(nn.Module):
    """A task with a non-view input: ``forward(x, y) -> (loss, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 1)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = (self.linear(x).squeeze(1) - y).pow(2).mean()
        return loss, {"abs": loss.detach().sqrt()}


def _data(epoch: int, n: int = 6) -> list[Batch]:
    g = torch.Generator().manual_seed(epoch)
    return [Batch(torch.randn(4, 3, generator=g), torch.randn(4, generator=g)) for _ in range(n)]


def len_y(batch: Batch) -> int:
    return len(batch.y)


def _inputs(batch: Batch, seed: int) -> tuple[Tensor, Tensor]:
    return batch.x, batch.y


class Log(Hook):
    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at

    def should_stop(self, state):
        return "asked" if state.step == self.stop_at else None

    def after_step(self, state, out):
        self.events.append(("step", out.step, out.done, out.stop, out.images))

    def after_epoch(self, state):
        self.events.append(("epoch", state.epoch, state.step))

    def after_run(self, state):
        self.events.append(("end", state.step))


def _train(total: int, accum: int, state=None, hooks=(), clock=None):
    model = Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = Schedule(total, 0.1, warmup_steps=2)
    state = state or Position()
    run_steps(
        TorchBackend(model, opt, accum, clock=clock),
        _inputs,
        _data,
        schedule,
        state,
        list(hooks),
        grad_accum=accum,
        clock=clock,
        images_of=len_y,
    )
    return model, state


def test_matches_a_hand_written_loop_with_accumulation():
    model, state = _train(total=5, accum=2)
    ref = Regression()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    step = 0
    for epoch in range(3):
        for i, b in enumerate(_data(epoch)):
            if i % 2 == 0:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, 5, 0.1, 2)
            loss, _ = ref(b.x, b.y)
            (loss / 2).backward()
            if (i + 1) % 2:
                continue
            opt.step()
            opt.zero_grad()
            step += 1
            if step == 5:
                break
        if step == 5:
            break
    assert (state.step, state.epoch, state.batch_in_epoch, state.stopped) == (5, 1, 4, None)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hooks_see_steps_epochs_and_the_end_in_order():
    log = Log()
    _train(total=4, accum=1, hooks=[log])
    assert log.events == [
        ("step", 1, False, None, 4),
        ("step", 2, False, None, 4),
        ("step", 3, False, None, 4),
        ("step", 4, True, None, 4),
        ("end", 4),
    ]
    log = Log()
    _train(total=7, accum=1, hooks=[log])  # 6 batches per epoch: one epoch boundary
    assert ("epoch", 1, 6) in log.events and log.events[-1] == ("end", 7)


def test_a_hook_stops_the_run_and_the_state_says_why():
    log, recorder = Log(stop_at=3), Recorder()
    _, state = _train(total=10, accum=2, hooks=[log, recorder])
    assert state.step == 3 and state.stopped == "asked"
    assert log.events[-2] == ("step", 3, False, "asked", 8)  # every hook saw the stop
    assert len(recorder.losses) == 3 and recorder.images == 3 * 8


class Closes(Log):
    """Records `close`; raises after step `fail_at` when asked."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.fail_at = fail_at

    def after_step(self, state, out):
        super().after_step(state, out)
        if out.step == self.fail_at:
            raise RuntimeError("deliberate")

    def close(self):
        self.events.append(("close",))


def test_an_error_skips_after_run_but_every_hook_closes():
    """`after_run` may hold a collective: after an error the other ranks may be elsewhere, so
    only `close` (local clean-up) runs, on every hook, the failing one included."""
    failing, other = Closes(fail_at=2), Closes()
    with pytest.raises(RuntimeError, match="deliberate"):
        _train(total=5, accum=1, hooks=[failing, other])
    assert failing.events[-2:] == [("step", 2, False, None, 4), ("close",)]
    assert other.events[-1] == ("close",) and ("end", 2) not in other.events
    ok = Closes()
    _train(total=3, accum=1, hooks=[ok])
    assert ok.events[-2:] == [("end", 3), ("close",)]  # a run that ended well: both, in order


def test_resume_skips_what_the_stream_position_says():
    # Stop after 2 steps of 2 micro-batches, then continue: the same as one run of 5 steps.
    first, state = _train(total=5, accum=2, hooks=[Log(stop_at=2)])
    assert (state.step, state.batch_in_epoch) == (2, 4)
    model = Regression()
    model.load_state_dict(first.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backend = TorchBackend(model, opt, 2)
    run_steps(backend, _inputs, _data, Schedule(5, 0.1, 2), state, grad_accum=2, images_of=len_y)
    whole, _ = _train(total=5, accum=2)
    assert state.step == 5
    for a, b in zip(model.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_phase_clock_books_each_phase():
    clock = PhaseClock()
    _train(total=3, accum=1, clock=clock)
    seconds = clock.take()
    assert {"data", "inputs", "forward", "backward", "optimizer"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values()) and clock.take() == {}


def test_batches_may_be_none_and_an_empty_epoch_is_an_error():
    model = Regression()
    x, y = torch.randn(4, 3), torch.randn(4)
    backend = TorchBackend(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state = run_steps(
        backend,
        lambda batch, seed: (x, y),
        lambda epoch: [None] * 3,  # the inputs need nothing from the batch
        Schedule(5, 0.1),
        Position(),
        images_of=lambda batch: 4,
    )
    assert (state.step, state.epoch) == (5, 1)
    with pytest.raises(ValueError, match="no batches"):
        run_steps(backend, _inputs, lambda epoch: [], Schedule(5, 0.1), Position())
