"""Single-process training with a plain torch optimizer: no Ray, no DeepSpeed.

The reference the distributed trainer is measured against (`ssl-dist bench train`), and the
quickest way to check that a method learns on a small data set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ssl_dist.config import Config
from ssl_dist.data.stream import open_shards, stream
from ssl_dist.evaluate.knn import knn_accuracy
from ssl_dist.optim import build_optimizer, param_groups
from ssl_dist.train.parts import build_model, build_views, plan_steps, view_seed


@dataclass
class LocalResult:
    losses: list[float] = field(default_factory=list)
    knn_init: float | None = None
    knn_final: float | None = None
    images_per_s: float = 0.0
    steps: int = 0


def run_local(
    cfg: Config,
    knn: bool = True,
    on_step: Callable[[int, float, dict], None] | None = None,
) -> LocalResult:
    """Train ``cfg`` in this process for its planned steps; kNN accuracy before and after."""
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    shards = open_shards(cfg.data)
    plan = plan_steps(cfg, shards, world_size=1)
    views = build_views(cfg, shards.manifest)
    method = build_model(cfg)
    groups = param_groups(method, cfg.optim.weight_decay)
    optimizer = build_optimizer(groups, cfg.optim, plan.peak_lr)
    num_classes = len(shards.manifest.classes)
    result = LocalResult()
    if knn:
        result.knn_init = knn_accuracy(method.encoder, cfg.data, views, num_classes)
    step, images, start = 0, 0, time.perf_counter()
    for epoch in range(cfg.run.epochs):
        for i, batch in enumerate(stream(cfg.data, 0, 1, epoch, cfg.run.seed, shards=shards)):
            x1, x2 = views(batch.images, seed=view_seed(cfg.run.seed, epoch, i, 0))
            loss, metrics = method(x1, x2)
            (loss / cfg.optim.grad_accum).backward()
            if (i + 1) % cfg.optim.grad_accum:
                continue
            for g in optimizer.param_groups:
                g["lr"] = plan.lr(step, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            method.momentum_update(step, plan.total_steps)
            images += batch.images.shape[0] * cfg.optim.grad_accum
            result.losses.append(loss.item())  # a CPU-GPU sync point on GPU; fine here
            if on_step is not None:
                on_step(step, result.losses[-1], metrics)
            if step >= plan.total_steps:
                break
        if step >= plan.total_steps:
            break
    result.images_per_s = images / (time.perf_counter() - start)
    result.steps = step
    if knn:
        result.knn_final = knn_accuracy(method.encoder, cfg.data, views, num_classes)
    return result
