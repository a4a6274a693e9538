"""Elastic runs (``scaling.num_workers: [min, max]``): Ray Train restarts the worker group at a
new size from the last checkpoint, and the worker loop carries on from there (:func:`elastic_plan`,
:func:`resize`):

* ZeRO 1-3 state is re-partitioned for the new world size (``zero.load(..., reshard=True)``);
  model, momentum encoder, buffers (the MoCo v2 queue) and optimizer state carry over exactly.
* The run keeps the step count it planned at its first world size (``run.max_steps`` when set,
  else ``epochs`` x steps per epoch at that size), so the learning-rate and momentum schedules
  keep their length. ``keep_per_worker_batch``: the global batch follows the world size and the
  peak learning rate is rescaled with it (``optim.lr_scaling``); an epoch-based plan then sees
  more (grown) or fewer (shrunk) samples than ``run.epochs`` passes. ``keep_global_batch``:
  gradient accumulation makes up the first size's global batch (refused if it does not divide),
  so learning rate and samples per step stay the same.
* The stream position is approximate: ``batch_in_epoch`` counted the old split's micro-batches;
  at the new size the run skips ``batch_in_epoch * old_size // new_size`` micro-batches (rounded
  down to whole optimizer steps), about as many samples of the epoch as were consumed. The new
  split deals the shards differently, so within this epoch some samples are seen twice and some
  not at all; later epochs are exact again.
* ``TrainState.world_sizes`` records ``[step, size]`` at the start and at every change; MLflow
  gets a ``world_size`` metric at every (re)start and the history as a run tag.
"""

from __future__ import annotations

import dataclasses
import sys

from ssl_dist.config import Config
from ssl_dist.train import checkpoint as ckpt
from ssl_dist.train.parts import StepPlan, plan_steps


def elastic_plan(cfg: Config, shards, world_size: int, first_size: int) -> tuple[StepPlan, int]:
    """The step plan and gradient accumulation at `world_size` for a run that started with
    `first_size` workers (see the module docstring for the policies)."""
    accum = cfg.optim.grad_accum
    if world_size == first_size:
        return plan_steps(cfg, shards, world_size), accum
    if cfg.scaling.elastic_policy == "keep_global_batch":
        global_batch = cfg.data.batch_size * first_size * accum
        per_micro = cfg.data.batch_size * world_size
        if global_batch % per_micro:
            raise ValueError(
                f"scaling.elastic_policy=keep_global_batch: the global batch {global_batch} "
                f"(data.batch_size={cfg.data.batch_size} x {first_size} workers x "
                f"optim.grad_accum={accum}) is not a multiple of {per_micro} (batch_size x "
                f"{world_size} workers), so no gradient accumulation keeps it at {world_size} "
                "workers; choose grad_accum and the [min, max] range so that it divides, or use "
                "keep_per_worker_batch"
            )
        accum = global_batch // per_micro
    optim = cfg.optim.model_copy(update={"grad_accum": accum})
    plan = plan_steps(cfg.model_copy(update={"optim": optim}), shards, world_size)
    # The run keeps the step count it planned at its first size (and so its schedules).
    planned = plan_steps(cfg, shards, first_size).total_steps
    return dataclasses.replace(plan, total_steps=planned), accum


def resize(
    state: ckpt.TrainState,
    world_size: int,
    plan: StepPlan,
    micro: int,
    method,
    cfg: Config,
    rank: int,
) -> None:
    """Carry a checkpoint written by `state.world_size` workers over to `world_size`: the
    stream position (approximate, see the module docstring) and the method's own state (the
    MoCo v2 queue pointer)."""
    old = state.batch_in_epoch
    state.batch_in_epoch = old * state.world_size // world_size // micro * micro
    if state.batch_in_epoch >= plan.batches_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    method.resize(cfg.data.batch_size, world_size)  # the method's own state (MoCo's queue)
    if rank == 0:
        print(
            f"world size {state.world_size} -> {world_size}: stream position micro-batch "
            f"{old} -> {state.batch_in_epoch} of epoch {state.epoch}, global batch "
            f"{plan.global_batch}, peak lr {plan.peak_lr:.4g}, {plan.total_steps} steps "
            "in all",
            file=sys.stderr,
        )
