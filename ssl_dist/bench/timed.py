"""Timing a few training steps for the throughput benches (`gpu_check`, `bench efficiency`):
the worker's step loop on the run's own stream, the clock started after a warm-up."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ssl_dist.config import Config
from ssl_dist.data.stream import ShardSet, stream
from ssl_dist.train.parts import view_seed
from ssl_dist.train.runtime import Hook, PhaseClock, Position, Schedule, run_steps

PHASES = ("data", "inputs", "forward", "backward", "optimizer")


class Timer(Hook):
    """Starts the clock after `warmup` optimizer steps (the device synchronised), then counts
    images; the phase sums and peak memory are taken over the timed steps only."""

    def __init__(self, warmup: int, clock: PhaseClock, device: torch.device) -> None:
        self.warmup, self.clock, self.device = warmup, clock, device
        self.start = time.perf_counter()
        self.images = self.steps = 0
        self.losses: list[float] = []
        self.warmup_s = 0.0
        """Seconds of the untimed steps (data start-up, first-use work such as compilation)."""

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def after_step(self, state, out) -> None:
        self.losses.append(out.loss.item())
        if out.step == self.warmup:
            self._sync()
            self.warmup_s = time.perf_counter() - self.start
            self.clock.take()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.start, self.images, self.steps = time.perf_counter(), 0, 0
        elif out.step > self.warmup:
            self.images += out.images
            self.steps += 1

    def result(self) -> dict[str, Any]:
        self._sync()
        seconds = time.perf_counter() - self.start
        phases = self.clock.take()
        per_step = {f"{p}_ms": 1e3 * phases.get(p, 0.0) / max(self.steps, 1) for p in PHASES}
        return {"seconds": seconds, "images_s": self.images / seconds, **per_step}

    def run(
        self, cfg: Config, backend: Any, inputs: Any, shards: ShardSet, steps: int, lr: float
    ) -> dict[str, Any]:
        """``warmup + steps`` steps of `cfg`'s stream (crops cut in the loader, as a worker's)
        through `backend` at a constant `lr`; the timed steps' figures, and the last loss."""
        crops = getattr(inputs, "crop_scale", None)
        run_steps(
            backend,
            inputs,
            lambda epoch: stream(
                cfg.data, 0, 1, epoch, cfg.run.seed, shards=shards, crop_scale=crops
            ),
            Schedule(self.warmup + steps, lr),
            Position(),
            [self],
            seed=lambda epoch, i: view_seed(cfg.run.seed, epoch, i, 0),
            clock=self.clock,
        )
        out = self.result()
        if not all(math.isfinite(v) for v in self.losses):
            raise FloatingPointError(f"non-finite loss: {self.losses}")
        return {**out, "last_loss": self.losses[-1], "warmup_s": self.warmup_s}
