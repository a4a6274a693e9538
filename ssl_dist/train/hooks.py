"""The Ray worker's concerns, each a hook of the step loop (:mod:`ssl_dist.train.runtime`).

In the order the worker runs them after every optimizer step:

* :class:`StopAgreement`: preemption (SIGTERM), the run's time limit and ``run.stop_at_step``,
  agreed across ranks by one small all-reduce per step;
* :class:`Progress`: throughput, the mean loss over ranks every ``run.log_every`` steps, the
  progress bar, ``progress.json`` and the rank-0 MLflow logger;
* :class:`KnnMonitor`: kNN accuracy on the val split every ``tracking.knn_every_epochs`` epochs
  and at the end (its time is not counted as training time);
* :class:`Checkpoints`: a checkpoint every ``run.checkpoint_every`` steps, at a stop and at the
  end, reported to Ray Train (each rank writes its own DeepSpeed shard);
* :class:`DataReport`: each epoch's damaged shards and lost, skipped and repeated samples.

Every hook runs on every rank; the collectives inside them run at the same step everywhere.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
from tqdm import tqdm

from ssl_dist.artifact import encoder_state, write_artifact
from ssl_dist.atomic import write_atomic
from ssl_dist.config import Config
from ssl_dist.data.damage import EpochDamage
from ssl_dist.dist import collectives, memory, zero
from ssl_dist.train import checkpoint as ckpt
from ssl_dist.train.runtime import Hook, Schedule, Step
from ssl_dist.train.tracker import Tracker


class Preempted:
    """Set by SIGTERM; checked at step boundaries, agreed across ranks, then checkpoint + exit."""

    flag = False

    @classmethod
    def install(cls) -> None:
        cls.flag = False  # a fresh segment, even in a process that was preempted before

        def handler(signum: int, frame: Any) -> None:
            cls.flag = True

        # Outside the main thread signal() raises ValueError: no chance to checkpoint there.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, handler)


class StopAgreement(Hook):
    """``preempted`` / ``time_limit`` on every rank when any rank got SIGTERM or is past the
    run's time limit (`deadline`, on ``time.monotonic()``), ``stop_at_step`` at that step:
    a two-value all_reduce per step, on the training device (NCCL reduces only GPU tensors)."""

    def __init__(
        self, deadline: float | None, stop_at_step: int | None, rank: int, device: torch.device
    ) -> None:
        self.deadline, self.stop_at_step, self.rank = deadline, stop_at_step, rank
        self.device = device

    def should_stop(self, state) -> str | None:
        late = self.deadline is not None and time.monotonic() >= self.deadline
        local = torch.tensor([float(Preempted.flag), float(late)], device=self.device)
        flags = collectives.all_reduce_max(local).tolist()  # a sync point on a GPU
        if flags[0] > 0:
            Preempted.flag = True
            return "preempted"
        if flags[1] > 0:
            if self.rank == 0:
                print(
                    f"run.time_limit_s reached at step {state.step}: stopping with a "
                    "checkpoint; run the same name again to continue",
                    file=sys.stderr,
                )
            return "time_limit"
        return "stop_at_step" if state.step == self.stop_at_step else None


class Speed:
    """Steady-state throughput: the clock starts after WARMUP steps of this invocation."""

    WARMUP = 5

    def __init__(self, start_step: int) -> None:
        self.start_step, self.t0, self.images, self.steps = start_step, 0.0, 0, 0

    def tick(self, step: int, global_images: int) -> None:
        if step - self.start_step == self.WARMUP:
            self.t0 = time.perf_counter()
        elif step - self.start_step > self.WARMUP:
            self.images += global_images
            self.steps += 1

    def pause(self, work) -> None:
        """Run `work` (evaluation) without counting its time as training time."""
        t = time.perf_counter()
        work()
        if self.steps or self.t0:
            self.t0 += time.perf_counter() - t

    def summary(self) -> dict[str, float]:
        secs = time.perf_counter() - self.t0 if self.steps else 0.0
        return {
            "images_s": self.images / secs if secs else 0.0,
            "step_ms": 1e3 * secs / self.steps if self.steps else 0.0,
        }


class Progress(Hook):
    """Throughput, and every ``run.log_every`` steps (and at the end): the mean loss over ranks
    (an all_reduce: a sync point, and a CPU-GPU sync on a GPU), MLflow metrics through the
    tracker, the progress bar and ``progress.json`` (for "steps lost" after a restart)."""

    def __init__(
        self,
        cfg: Config,
        schedule: Schedule,
        tracker: Tracker,
        speed: Speed,
        start_step: int,
        world_size: int,
        rank: int,
    ) -> None:
        self.cfg, self.schedule, self.tracker, self.speed = cfg, schedule, tracker, speed
        self.world_size, self.rank = world_size, rank
        self.run_dir = Path(cfg.run.storage_path) / cfg.run.name
        self.bar = _progress(schedule.total_steps, start_step) if rank == 0 else None
        self.t_last, self.images_since = time.perf_counter(), 0

    def after_step(self, state, out: Step) -> None:
        self.speed.tick(out.step, out.images * self.world_size)
        self.images_since += out.images
        if out.step % self.cfg.run.log_every and not out.done:
            return
        if self.rank == 0 and "://" not in self.cfg.run.storage_path:
            ckpt.write_progress(self.run_dir, out.step)
        mean_loss = collectives.all_reduce_mean(out.loss.float()).item()
        now = time.perf_counter()
        ips = self.images_since * self.world_size / (now - self.t_last)
        self.t_last, self.images_since = now, 0
        lr = self.schedule.lr(out.step - 1)
        values = {
            "loss": mean_loss,
            "lr": lr,
            "images_s": ips,
            "momentum": out.momentum,
            "epoch": state.epoch,
        }
        self.tracker.step(out.step, values, out.metrics)
        if self.bar is not None:
            self.bar.update(out.step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{mean_loss:.3f}", m=f"{out.momentum:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(total: int, initial: int):

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        desc="pretrain",
        file=sys.stderr,
        mininterval=1.0,
        disable=os.environ.get("SSL_DIST_NO_PROGRESS") == "1",
    )


class KnnMonitor(Hook):
    """kNN accuracy of the online encoder every ``tracking.knn_every_epochs`` epochs and after
    the last step, outside the throughput clock."""

    def __init__(self, cfg: Config, method, tracker: Tracker, speed: Speed) -> None:
        self.every = max(cfg.tracking.knn_every_epochs, 1)
        self.method, self.tracker, self.speed = method, tracker, speed

    def after_step(self, state, out: Step) -> None:
        if out.done:
            self.speed.pause(lambda: self.tracker.knn(self.method, out.step))

    def after_epoch(self, state) -> None:
        if state.epoch % self.every == 0:
            self.speed.pause(lambda: self.tracker.knn(self.method, state.step))


class Checkpoints(Hook):
    """A checkpoint every ``run.checkpoint_every`` steps, at a stop and after the last step
    (with the run's throughput and memory figures), reported to Ray Train with the step's
    loss (mean over ranks)."""

    def __init__(
        self,
        cfg: Config,
        engine,
        state: ckpt.TrainState,
        total_steps: int,
        tracker: Tracker,
        speed: Speed,
        world_size: int,
        rank: int,
    ) -> None:
        self.cfg, self.engine, self.state, self.total = cfg, engine, state, total_steps
        self.tracker, self.speed, self.world_size, self.rank = tracker, speed, world_size, rank

    def after_step(self, state, out: Step) -> None:
        if out.step % self.cfg.run.checkpoint_every and not (out.done or out.stop):
            return
        # Throughput and memory whenever the run ends here: its last step, or a stop agreed on
        # every rank (a time limit ends most budgeted runs; the figures are a collective).
        final = self._final_metrics() if out.done or out.stop else {}
        # The step's loss, mean over ranks (a collective: every rank saves at this step).
        final["loss"] = collectives.all_reduce_mean(out.loss.float()).item()
        self._save(final)

    def _final_metrics(self) -> dict:
        """Throughput and per-rank memory at the end of a run (max over ranks: a collective)."""
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        state_mb = memory.state_bytes(self.engine) / 2**20
        peak = collectives.all_reduce_max(torch.tensor([rss_mb, state_mb], dtype=torch.float64))
        module = self.engine.module
        formula = memory.zero_formula_bytes(module, self.cfg.zero.stage, self.world_size) / 2**20
        return {
            **self.speed.summary(),
            "peak_rss_mb": peak[0].item(),
            "state_mb": peak[1].item(),
            "zero_formula_mb": formula,
        }

    def _save(self, extra: dict) -> None:
        """Every rank writes its DeepSpeed shard into its own temp dir; Ray merges them into one
        checkpoint. Rank 0 adds the consolidated encoder, the config and (last) the train
        state."""
        cfg, state = self.cfg, self.state
        with tempfile.TemporaryDirectory(prefix="ssl-dist-ckpt-") as tmp:
            d = Path(tmp)
            zero.save(self.engine, d / ckpt.DEEPSPEED_DIR, client_state={"step": state.step})
            ckpt.save_rng(d, self.rank)
            full = zero.consolidated_state_dict(self.engine)  # a collective under ZeRO-3
            if self.rank == 0:
                assert full is not None
                write_artifact(d, encoder_state(full), cfg, step=str(state.step))
                state.mlflow_run_id = self.tracker.run_id or state.mlflow_run_id
                write_atomic(d / ckpt.STATE, state.to_json())
                self.tracker.checkpoint(d, state.step)
            metrics = {
                "step": state.step,
                "epoch": state.epoch,
                "total_steps": self.total,
                "world_size": state.world_size,
                **extra,
            }
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class DataReport(Hook):
    """At the end of each epoch (and of this segment), where every rank arrives: every rank's
    lost, skipped and top-up counts and its damaged shards, gathered to rank 0 (a collective)
    and reported there. `current` is the epoch's stream (set by the loop's batch source)."""

    def __init__(self, shards, tracker: Tracker, device: torch.device) -> None:
        self.shards, self.tracker, self.device = shards, tracker, device
        self.current: Any = None

    def after_epoch(self, state) -> None:
        self._report(state.step)

    def after_run(self, state) -> None:
        self._report(state.step)

    def _report(self, step: int) -> None:
        if self.current is None:
            return
        names = [info.name for info in self.shards.infos]
        row = self.current.stats.row(names).to(self.device)[None]
        rows = collectives.all_gather_no_grad(row)
        self.tracker.data(step, EpochDamage.from_rows(rows.cpu(), names))
        self.current = None
