"""The one step loop: a task's steps on a backend, with each concern as a hook.

Every training loop of the project is a configuration of :func:`run_steps`:

* the Ray Train worker (:mod:`ssl_dist.train.loop`): DeepSpeed backend; hooks for stop
  agreement, progress and tracking, the kNN monitor, checkpoint + report;
* the single-process reference (:mod:`ssl_dist.train.local`): plain torch backend;
* full fine-tuning (:mod:`ssl_dist.evaluate.finetune`): a classification task on DeepSpeed;
* the supervised baseline of ``bench quality``: a classification task, plain torch, a time
  limit;
* the phase timing of ``bench scaling``: plain torch with a gradient all-reduce and a
  :class:`PhaseClock`.

One pass reads top to bottom: for each micro-batch of each epoch, set the learning rate at the
first micro-batch of an optimizer step, build the task's inputs on the device, forward,
backward, step (the backend steps the optimizer at the accumulation boundary); after each
optimizer step, the momentum update, then the hooks: first every hook may ask to stop, then every
hook sees the step (with ``done`` / ``stop`` known, so a checkpoint hook can save the last one).
The stream position (``state.batch_in_epoch``) lets a resumed run skip what it already read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ssl_dist import precision as precision_
from ssl_dist.dist import zero
from ssl_dist.methods.base import Inputs
from ssl_dist.optim import lr_at


class Progress(Protocol):
    """Where a run is; :class:`ssl_dist.train.checkpoint.TrainState` is one."""

    step: int
    epoch: int
    batch_in_epoch: int
    stopped: str | None


@dataclass
class Position:
    """A :class:`Progress` for runs that keep no checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    stopped: str | None = None


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps of the run and the one learning-rate schedule (:func:`lr_at`)."""

    total_steps: int
    peak_lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        return lr_at(step, self.total_steps, self.peak_lr, self.warmup_steps, self.min_lr_ratio)


# ---------------------------------------------------------------------------------- backends


class Backend(Protocol):
    """Forward, backward and optimizer step of one model, however it is distributed."""

    module: nn.Module

    def set_lr(self, lr: float) -> None: ...

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]: ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> None:
        """Called after every micro-batch's backward; steps at the accumulation boundary."""
        ...

    def momentum_update(self, step: int, total_steps: int) -> float: ...


def _task_output(out: Any) -> tuple[Tensor, dict[str, Tensor]]:
    return out if isinstance(out, tuple) else (out, {})


class TorchBackend:
    """A plain torch optimizer in this process.

    Args:
        module: The task (its forward returns ``(loss, metrics)``, or a bare loss).
        optimizer: Over the module's trainable parameters.
        grad_accum: Micro-batches per optimizer step (the loss is divided by it).
        allreduce: Called on the parameters with gradients before each optimizer step (a
            data-parallel gradient average, as in ``bench scaling``); None in one process.
        clock: Books the gradient all-reduce and the optimizer step on a :class:`PhaseClock`.
        precision: ``fp32``, ``bf16`` (autocast around the forward; weights, gradients and
            optimizer state stay float32, as in :class:`DeepSpeedBackend`) or ``auto``
            (:func:`ssl_dist.precision.resolve` for the module's device).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_accum: int = 1,
        allreduce: Callable[[list[nn.Parameter]], None] | None = None,
        clock: PhaseClock | None = None,
        precision: str = "fp32",
    ) -> None:
        self.module, self.optimizer, self.grad_accum = module, optimizer, grad_accum
        self.allreduce, self.clock = allreduce, clock or PhaseClock.off()
        self.device = next(module.parameters()).device
        self.precision = precision_.resolve(precision, self.device)
        self._micro = 0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        with precision_.autocast(self.device, self.precision):
            return _task_output(self.module(*inputs))

    def backward(self, loss: Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.grad_accum:
            return
        if self.allreduce is not None:
            with self.clock.phase("grad_allreduce"):
                self.allreduce([p for p in self.module.parameters() if p.grad is not None])
        with self.clock.phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def momentum_update(self, step: int, total_steps: int) -> float:
        update = getattr(self.module, "momentum_update", None)
        return float(update(step, total_steps)) if update is not None else 0.0


class DeepSpeedBackend:
    """A DeepSpeed engine (ZeRO 0-3): it averages gradients over ranks, accumulates and steps.
    Under bf16 the engine itself autocasts its forward (:mod:`ssl_dist.dist.zero`). `clock`
    books the engine's step (the gradient reduction of ZeRO 1-3 partly happens in backward)."""

    def __init__(self, engine: Any, clock: PhaseClock | None = None) -> None:
        self.engine, self.clock = engine, clock or PhaseClock.off()
        self.module = engine.module

    def set_lr(self, lr: float) -> None:

        zero.set_lr(self.engine, lr)

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        return _task_output(self.engine(*inputs))

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / grad_accum

    def step(self) -> None:
        with self.clock.phase("optimizer"):
            self.engine.step()  # steps only at the accumulation boundary

    def momentum_update(self, step: int, total_steps: int) -> float:

        if not hasattr(self.module, "momentum_pairs"):
            return 0.0
        return zero.momentum_update(self.module, step, total_steps)  # gathers under ZeRO-3


# ---------------------------------------------------------------------------------- timing


class PhaseClock:
    """Seconds per phase of a step (data wait, inputs, forward, backward, gradient all-reduce,
    optimizer), summed until read. On a GPU each phase ends with a synchronisation, so the time
    is the device's, not the launch's; off (no clock reads, no syncs) unless asked for."""

    def __init__(self, enabled: bool = True, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self.sync = enabled and device is not None and device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @classmethod
    def off(cls) -> PhaseClock:
        return cls(enabled=False)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """The sums since the last call, reset to zero."""
        out, self.seconds = self.seconds, {}
        return out


# ---------------------------------------------------------------------------------- hooks


@dataclass
class Step:
    """What hooks see after an optimizer step."""

    step: int
    """Optimizer steps done, this one included."""
    loss: Tensor
    """The last micro-batch's loss (detached; reading it is a sync point on a GPU)."""
    metrics: dict[str, Tensor]
    """The task's detached metrics of the last micro-batch."""
    images: int
    """Images this rank consumed in this optimizer step."""
    momentum: float
    """Momentum of the target networks after their update (0 without them)."""
    done: bool
    """The last step of the run."""
    stop: str | None
    """Why the run stops here before its last step (a hook asked), else None."""


class Hook:
    """One concern of a run; every method is optional. Hooks run in order on every rank, so a
    hook that calls a collective calls it on every rank at the same step."""

    def should_stop(self, state: Progress) -> str | None:
        """After an optimizer step, before `after_step`: a reason to stop now, or None."""
        return None

    def after_step(self, state: Progress, out: Step) -> None:
        """After each optimizer step (with ``done`` / ``stop`` decided)."""

    def after_epoch(self, state: Progress) -> None:
        """After an epoch's last micro-batch, with ``state.epoch`` already the next one."""

    def after_run(self, state: Progress) -> None:
        """Once at the end of a run that ended well (steps done, stopped, or nothing to do):
        every rank gets here, so a collective is safe. Not called when the loop raised."""

    def close(self) -> None:
        """Once at the end however the run ended, an error included, after `after_run`: local
        clean-up only. No collective: after an error the other ranks may be anywhere, and a
        collective here would hold the error (and the run) until the group's timeout."""


@dataclass
class Recorder(Hook):
    """Keeps every step's loss (a sync point per step on a GPU) and calls `on_step`."""

    on_step: Callable[[int, float, dict[str, Tensor]], None] | None = None
    losses: list[float] = field(default_factory=list)
    images: int = 0

    def after_step(self, state: Progress, out: Step) -> None:
        self.losses.append(out.loss.item())
        self.images += out.images
        if self.on_step is not None:
            self.on_step(out.step, self.losses[-1], out.metrics)


@dataclass
class TimeLimit(Hook):
    """Stops at the first optimizer step past `deadline` (on ``time.monotonic()``) in one
    process; the Ray worker agrees on it across ranks instead (see :mod:`.loop`)."""

    deadline: float

    def should_stop(self, state: Progress) -> str | None:
        return "time_limit" if time.monotonic() >= self.deadline else None


# ---------------------------------------------------------------------------------- the loop

_END = object()
"""Marks the end of an epoch's batches (a batch may be anything, None included)."""


def run_steps(
    backend: Backend,
    inputs: Inputs,
    batches: Callable[[int], Iterable[Any]],
    schedule: Schedule,
    state: Progress,
    hooks: Sequence[Hook] = (),
    *,
    seed: Callable[[int, int], int] = lambda epoch, i: 0,
    grad_accum: int = 1,
    clock: PhaseClock | None = None,
    images_of: Callable[[Any], int] = lambda batch: len(batch.labels),
) -> Progress:
    """Train until ``schedule.total_steps`` optimizer steps are done or a hook stops the run.

    Args:
        backend: Where forward, backward and the optimizer run.
        inputs: The task's input builder: ``inputs(batch, seed) -> tuple`` for the forward.
        batches: ``batches(epoch)``: the micro-batches of one epoch (every rank the same count).
        schedule: Total optimizer steps and the learning rate at each.
        state: Where to start (a resumed run skips ``state.batch_in_epoch`` micro-batches of
            ``state.epoch``); updated in place and returned.
        hooks: The run's concerns, called in order (see :class:`Hook`).
        seed: ``seed(epoch, i)``: the augmentation seed of micro-batch `i`.
        grad_accum: Micro-batches per optimizer step.
        clock: Phase timing (data, inputs, forward, backward; the backend books the rest).
        images_of: Images in a batch (for throughput).
    """
    clock = clock or PhaseClock.off()
    try:
        while state.step < schedule.total_steps:
            args = (backend, inputs, batches, schedule, hooks, seed, grad_accum, clock, images_of)
            if _epoch(state, *args):
                break  # done or stopped
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            for hook in hooks:
                hook.after_epoch(state)
        for hook in hooks:
            hook.after_run(state)
    finally:
        for hook in hooks:
            hook.close()
    return state


def _epoch(
    state, backend, inputs, batches, schedule, hooks, seed, grad_accum, clock, images_of
) -> bool:
    """One epoch from ``state.batch_in_epoch``; True when the run is done or stopped."""
    images = 0
    it = iter(batches(state.epoch))
    i = -1
    while True:
        with clock.phase("data"):
            batch = next(it, _END)
        if batch is _END:
            if i < 0:  # no batch at all: another pass would loop for ever
                raise ValueError(f"epoch {state.epoch} has no batches: nothing to train on")
            return False
        i += 1
        if i < state.batch_in_epoch:
            continue  # fast-forward to where the checkpoint stopped in this epoch
        if i % grad_accum == 0:
            backend.set_lr(schedule.lr(state.step))
            images = 0
        with clock.phase("inputs"):
            x = inputs(batch, seed(state.epoch, i))
        with clock.phase("forward"):
            loss, metrics = backend.forward(x)
        with clock.phase("backward"):
            backend.backward(loss)
        backend.step()
        state.batch_in_epoch = i + 1
        images += images_of(batch)
        if (i + 1) % grad_accum:
            continue
        state.step += 1
        with clock.phase("optimizer"):  # the target networks' EMA, as part of the update
            momentum = backend.momentum_update(state.step, schedule.total_steps)
        done = state.step >= schedule.total_steps
        # Every hook is asked (one may run a collective that every rank must reach).
        reasons = [hook.should_stop(state) for hook in hooks]
        stop = next((r for r in reasons if r is not None), None)
        state.stopped = None if done else stop
        out = Step(state.step, loss.detach(), metrics, images, momentum, done, stop)
        for hook in hooks:
            hook.after_step(state, out)
        if done or stop:
            return True
