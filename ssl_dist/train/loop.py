"""The per-worker training loop that Ray Train runs on every rank.

Reads top to bottom: context -> data and the method (it builds its own inputs) -> DeepSpeed
engine -> resume (re-sharded at a new world size, :mod:`ssl_dist.train.elastic`) -> the step
loop (:func:`ssl_dist.train.runtime.run_steps`) with the worker's hooks
(:mod:`ssl_dist.train.hooks`: stop agreement, progress and tracking, kNN monitor, checkpoints,
data report). Every rank runs the same number of steps (the stream guarantees it), so the
collectives inside the loss, the engine, the hooks and the checkpoint never wait on a missing
rank.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
from safetensors.torch import load as load_safetensors

from ssl_dist import precision
from ssl_dist.config import Config
from ssl_dist.data.stream import open_shards, stream
from ssl_dist.dist import zero
from ssl_dist.train import checkpoint as ckpt
from ssl_dist.train.elastic import elastic_plan, resize
from ssl_dist.train.hooks import (
    Checkpoints,
    DataReport,
    KnnMonitor,
    Preempted,
    Progress,
    Speed,
    StopAgreement,
)
from ssl_dist.train.parts import build_model, view_seed
from ssl_dist.train.runtime import DeepSpeedBackend, run_steps
from ssl_dist.train.tracker import Tracker


def _device(cfg: Config) -> torch.device:
    if cfg.scaling.use_gpu != "no" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` holds the resolved run config as plain data."""
    cfg = Config.model_validate(config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    Preempted.install()
    device = _device(cfg)

    shards = open_shards(cfg.data)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    resumed = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        d = Path(stack.enter_context(resumed.as_directory())) if resumed is not None else None
        # Read before the engine is built: at a new world size the policy may change grad_accum.
        state = ckpt.TrainState(world_size=world_size) if d is None else ckpt.TrainState.read(d)
        if not state.world_sizes:  # a fresh run, or a checkpoint from before the history
            state.world_sizes.append([state.step, state.world_size])
        plan, micro = elastic_plan(cfg, shards, world_size, first_size=state.world_sizes[0][1])
        init = config.get("init_weights")  # the driver's warm start: safetensors bytes
        weights = load_safetensors(ray.get(init)) if init is not None else None
        method = build_model(cfg, weights).to(device)
        inputs = method.make_inputs(cfg, shards.manifest, device)
        optim = cfg.optim.model_copy(update={"grad_accum": micro})
        engine = zero.build_engine(
            method, cfg.zero, optim, cfg.data.batch_size, world_size, plan.peak_lr
        )
        if d is not None:
            zero.load(engine, d / ckpt.DEEPSPEED_DIR, reshard=True)
            ckpt.load_rng(d, rank)
            if rank == 0:
                reached = ckpt.read_progress(run_dir)
                lost = f"; {reached - state.step} steps lost" if reached else ""
                print(
                    f"resumed from step {state.step} (epoch {state.epoch}, saved by "
                    f"{state.world_size} workers, now {world_size}){lost}",
                    file=sys.stderr,
                )
            if state.world_size != world_size:
                resize(state, world_size, plan, micro, method, cfg, rank)
            state.world_size = world_size
            state.resumed_at.append(state.step)
    if state.world_sizes[-1][1] != world_size:
        state.world_sizes.append([state.step, world_size])
    views = getattr(inputs, "views", None)  # the evaluation view, for the kNN monitor
    tracker = Tracker(
        cfg, state, config.get("mlflow_run_id"), shards, views, device, rank, ctx.get_local_rank()
    )
    tracker.world_size(state.step, world_size, state.world_sizes)
    tracker.params({"zero.precision_used": precision.resolve(cfg.zero.precision, device)})
    if rank == 0:
        print(precision.describe(cfg.zero.precision, device), file=sys.stderr)
    if cfg.run.stop_at_step is not None and state.step >= cfg.run.stop_at_step:
        tracker.close()
        return  # this segment already ran

    # The driver's deadline (epoch seconds, the same on every node) on this worker's monotonic
    # clock: a wall-clock step during the run cannot move it.
    deadline = config.get("deadline")
    if deadline is not None:
        deadline = time.monotonic() + deadline - time.time()
    schedule, speed = plan.schedule(cfg), Speed(state.step)
    report = DataReport(shards, tracker, device)

    crops = getattr(inputs, "crop_scale", None)  # two-view tasks: crops cut in the loader

    def batches(epoch: int):
        report.current = stream(
            cfg.data, rank, world_size, epoch, cfg.run.seed, shards=shards, crop_scale=crops
        )
        return report.current

    run_steps(
        DeepSpeedBackend(engine),
        inputs,
        batches,
        schedule,
        state,
        [
            StopAgreement(deadline, cfg.run.stop_at_step, rank, device),
            Progress(cfg, schedule, tracker, speed, state.step, world_size, rank),
            report,
            KnnMonitor(cfg, method, tracker, speed),
            Checkpoints(cfg, engine, state, plan.total_steps, tracker, speed, world_size, rank),
        ],
        seed=lambda epoch, i: view_seed(cfg.run.seed, epoch, i, rank),
        grad_accum=micro,
    )
    tracker.close()
    if Preempted.flag:
        raise SystemExit("preempted: final checkpoint written")
