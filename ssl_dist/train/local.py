"""Single-process training with a plain torch optimizer: no Ray, no DeepSpeed.

The reference the distributed trainer is measured against (`ssl-dist bench train`), and the
quickest way to check that a method learns on a small data set. The same step loop as every
other run (:func:`ssl_dist.train.runtime.run_steps`) on a :class:`TorchBackend`.
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
from ssl_dist.train.parts import build_model, plan_steps, view_seed
from ssl_dist.train.runtime import Position, Recorder, TorchBackend, run_steps


@dataclass
class LocalResult:
    losses: list[float] = field(default_factory=list)
    knn_init: float | None = None
    knn_final: float | None = None
    scores_init: dict[str, float] = field(default_factory=dict)
    scores_final: dict[str, float] = field(default_factory=dict)
    """What `evaluate` returned for the encoder before and after training."""
    images_per_s: float = 0.0
    steps: int = 0


def run_local(
    cfg: Config,
    knn: bool = True,
    on_step: Callable[[int, float, dict], None] | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> LocalResult:
    """Train ``cfg`` in this process for its planned steps; kNN accuracy before and after, and
    `evaluate` (given the encoder, e.g. a linear probe) before and after."""
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    shards = open_shards(cfg.data)
    plan = plan_steps(cfg, shards, world_size=1)
    method = build_model(cfg)
    inputs = method.make_inputs(cfg, shards.manifest, "cpu")
    optimizer = build_optimizer(
        param_groups(method, cfg.optim.weight_decay), cfg.optim, plan.peak_lr
    )
    num_classes = len(shards.manifest.classes)
    result = LocalResult()
    views = getattr(inputs, "views", None)
    if knn and views is not None:
        result.knn_init = knn_accuracy(method.encoder, cfg.data, views, num_classes)
    if evaluate is not None:
        result.scores_init = evaluate(method.encoder)
    recorder = Recorder(on_step)
    crops = getattr(inputs, "crop_scale", None)  # two-view tasks: crops cut in the loader
    start = time.perf_counter()
    state = run_steps(
        TorchBackend(method, optimizer, cfg.optim.grad_accum, precision=cfg.zero.precision),
        inputs,
        lambda epoch: stream(cfg.data, 0, 1, epoch, cfg.run.seed, shards=shards, crop_scale=crops),
        plan.schedule(cfg),
        Position(),
        [recorder],
        seed=lambda epoch, i: view_seed(cfg.run.seed, epoch, i, 0),
        grad_accum=cfg.optim.grad_accum,
    )
    result.images_per_s = recorder.images / (time.perf_counter() - start)
    result.losses, result.steps = recorder.losses, state.step
    if knn and views is not None:
        result.knn_final = knn_accuracy(method.encoder, cfg.data, views, num_classes)
    if evaluate is not None:
        result.scores_final = evaluate(method.encoder)
    return result
