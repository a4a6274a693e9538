"""What every training loop builds from a config: views, method, step plan, learning rate.

Shared by the single-process reference loop (:mod:`ssl_dist.train.local`) and the Ray Train
worker loop, so both train exactly the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_dist.config import Config, ConfigError
from ssl_dist.data.shards import Manifest
from ssl_dist.data.stream import ShardSet, plan_exact
from ssl_dist.data.views import TwoViews, views_for
from ssl_dist.methods import SSLMethod, build_method
from ssl_dist.optim import scaled_lr
from ssl_dist.train.runtime import Schedule


def build_views(cfg: Config, manifest: Manifest) -> TwoViews:
    """Two-view augmentation normalised with the manifest's train mean/std."""
    return views_for(cfg, manifest)


def build_model(cfg: Config, init: dict[str, Tensor] | None = None) -> SSLMethod:
    """The method with its encoder, initialised from ``run.seed`` (same on every rank).

    Args:
        cfg: The run config.
        init: The warm start's encoder weights (`model.init_from`, resolved by the driver, see
            :func:`ssl_dist.train.driver.warm_start`); loaded into the online encoder and its
            momentum copy, heads start fresh. Required when `model.init_from` is set.
    """
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg.method, cfg.model, cfg.data.channels, cfg.data.image_size)
    if init is not None:
        warm_start(method, init, cfg)
    elif cfg.model.init_from:
        raise ValueError(
            f"model.init_from={cfg.model.init_from}: pass its weights (the driver resolves them)"
        )
    return method


def warm_start(method: SSLMethod, tensors: dict[str, Tensor], cfg: Config) -> None:
    """Load `tensors` into the online encoder and its momentum copy (strict)."""
    try:
        method.encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ConfigError(
            f"model.init_from={cfg.model.init_from} does not fit model.{cfg.model.encoder}: {e}"
        ) from None
    for target, online in method.momentum_pairs():
        if online is method.encoder:
            target.load_state_dict(online.state_dict())


@dataclass(frozen=True)
class StepPlan:
    batches_per_epoch: int
    """Micro-batches each rank reads per epoch."""
    steps_per_epoch: int
    """Optimizer steps per epoch (micro-batches / grad_accum)."""
    total_steps: int
    """Optimizer steps of the whole run (epochs x steps_per_epoch, capped by run.max_steps)."""
    global_batch: int
    peak_lr: float

    def schedule(self, cfg: Config) -> Schedule:
        """The run's learning-rate schedule over its total steps."""
        return Schedule(
            self.total_steps, self.peak_lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio
        )

    def lr(self, step: int, cfg: Config) -> float:
        return self.schedule(cfg).lr(step)


def plan_steps(cfg: Config, shards: ShardSet, world_size: int) -> StepPlan:
    """Step counts from the manifest alone, identical on every rank."""
    b = cfg.data.batch_size
    if cfg.data.mode == "exact":
        # Every epoch yields the same count: it depends only on the shard sizes' multiset split.
        _, batches = plan_exact(shards.counts, 0, world_size, 0, cfg.run.seed, b)
    else:
        batches = cfg.data.steps_per_epoch or max(1, sum(shards.counts) // (b * world_size))
    accum = cfg.optim.grad_accum
    steps_per_epoch = batches // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"optim.grad_accum={accum} exceeds the {batches} batches per epoch; lower it"
        )
    total = cfg.run.epochs * steps_per_epoch
    if cfg.run.max_steps is not None:
        total = min(total, cfg.run.max_steps)
    global_batch = b * world_size * accum
    peak = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.base_batch, cfg.optim.lr_scaling)
    return StepPlan(batches, steps_per_epoch, total, global_batch, peak)


def view_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Augmentation seed of one micro-batch: reproducible, different on every rank and step."""
    return (seed * 1_000_003 + epoch * 10_007 + step) * 4099 + rank
