"""`ssl-dist pretrain`: build a Ray Train V2 TorchTrainer from the config and run it.

Elastic runs (``scaling.num_workers: [min, max]`` -> ``ScalingConfig(num_workers=(min, max))``),
as Ray 2.60's Train V2 implements them (``ray/train/v2/_internal/execution/scaling_policy/
elastic.py``):

* The controller asks Ray's AutoscalingCoordinator for ``max`` workers' resources and starts the
  group with as many workers as the resources reserved for it allow (at least ``min``; below
  that it waits). The coordinator refreshes its view of the cluster's nodes every 20 s.
* While the group runs, the policy compares that count with the group's size every
  ``elastic_resize_monitor_interval_s`` (Ray's default 60 s; here
  ``$SSL_DIST_ELASTIC_RESIZE_INTERVAL_S``); on a change (a node joined) it shuts the group down
  and starts one of the new size, whose workers resume from the last reported checkpoint.
* A node that leaves kills its workers: that is a worker-group failure, retried within
  ``run.max_failures`` (a drained / preempted node is charged to Ray's separate, unlimited,
  preemption budget instead), and the restart is sized by the same resource count, so the group
  comes back smaller. The count can lag by up to the coordinator's 20 s: a restart may first ask
  for the old size and wait ``$RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (default 60 s) for
  resources that are gone, then retry at the new size (controller retries are unlimited).
* Steps since the last checkpoint are lost on every resize; ``run.checkpoint_every`` bounds
  them. The training loop re-shards the ZeRO state and adapts the batch, learning rate and stream
  position (see :mod:`ssl_dist.train.loop`).

The driver also does what needs one process and the outside world: it resolves the warm start
(`model.init_from`: a registry model, run artifact or checkpoint) once and hands its weights to
every worker as safetensors bytes through Ray's object store, and at the end it encodes a sample
of the val split with the trained encoder and hands it to tracking, which logs and registers
the model.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_safetensors
from torch import Tensor

from ssl_dist import tracking
from ssl_dist.artifact import CONFIG, build_encoder, read_config
from ssl_dist.config import Config, ConfigError, flatten
from ssl_dist.credentials import looks_secret
from ssl_dist.data.stream import open_shards
from ssl_dist.dist import zero
from ssl_dist.evaluate.embedding import encoder_sample
from ssl_dist.evaluate.source import load_source
from ssl_dist.methods import METHODS
from ssl_dist.train.checkpoint import is_complete


def _storage_path(cfg: Config) -> str:
    path = cfg.run.storage_path
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _use_gpu(cfg: Config) -> bool:
    import ray  # heavy (seconds): only once a run starts

    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.scaling.use_gpu == "yes"


def connect(cfg: Config) -> None:
    """Join `run.ray_address` (auto, ray://...) or start a local instance."""
    import ray  # heavy (seconds): only once a run starts

    if ray.is_initialized():
        return
    if cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address, log_to_driver=True)
    else:
        from ssl_dist.train.ray_logs import SETUP_HOOK

        ray.init(
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"worker_process_setup_hook": SETUP_HOOK},
        )


ELASTIC_RESIZE_INTERVAL_ENV = "SSL_DIST_ELASTIC_RESIZE_INTERVAL_S"
"""Seconds between Ray Train's checks for a new worker count in an elastic run (Ray: 60)."""


def _scaling(cfg: Config) -> dict:
    """ScalingConfig arguments for the worker count: fixed, or elastic (min, max)."""
    n = cfg.scaling.num_workers
    if isinstance(n, int):
        return {"num_workers": n}
    interval = float(os.environ.get(ELASTIC_RESIZE_INTERVAL_ENV, "60"))
    return {"num_workers": tuple(n), "elastic_resize_monitor_interval_s": interval}


def check_elastic(cfg: Config) -> None:
    """Refuse (exit 2) an elastic range that the method cannot train at every size; warn when a
    node leaving would end the run."""
    n = cfg.scaling.num_workers
    if isinstance(n, int):
        return
    method = METHODS[cfg.method.name]
    problems = {
        w: method.world_size_problem(cfg.method, cfg.data.batch_size, w)
        for w in range(n[0], n[1] + 1)
    }
    bad = [w for w, problem in problems.items() if problem]
    if bad:
        raise ConfigError(
            f"scaling.num_workers={list(n)}: {cfg.method.name} cannot train at "
            f"every size, not at {bad} (at {bad[0]}: {problems[bad[0]]})"
        )
    if cfg.run.max_failures == 0:
        warnings.warn(
            "elastic run with run.max_failures=0: a node that leaves fails its workers, which "
            "ends the run instead of restarting it smaller; set run.max_failures",
            stacklevel=2,
        )


def warm_start(cfg: Config) -> dict[str, Tensor] | None:
    """`model.init_from`'s encoder weights, or None without one. Read once, here: a registry
    lookup or a download per worker would multiply the load on the tracking server. Weights
    that do not fit `model.encoder` are refused here (exit 2), before any worker starts."""
    if not cfg.model.init_from:
        return None
    source = load_source(cfg.model.init_from, tracking_uri=cfg.tracking.uri)
    try:
        build_encoder(cfg, source.tensors)
    except ConfigError as e:
        raise ConfigError(f"model.init_from={cfg.model.init_from}: {e}") from None
    return source.tensors


def build_trainer(
    cfg: Config, mlflow_run_id: str | None = None, init: dict[str, Tensor] | None = None
):
    """The pretraining TorchTrainer. `init`: the warm start's weights (default: read from
    `model.init_from` here); they reach the workers as ``init_weights``, safetensors bytes in
    Ray's object store. Call after :func:`connect`."""
    import ray  # heavy (seconds): only once a run starts

    from ssl_dist.train.loop import train_loop_per_worker  # heavy: ray.train (seconds)

    check_elastic(cfg)
    if init is None:
        init = warm_start(cfg)
    limit = cfg.run.time_limit_s
    deadline = time.time() + limit if limit else None  # epoch seconds: every node compares
    extra = {
        "mlflow_run_id": mlflow_run_id,
        "deadline": deadline,
        "init_weights": ray.put(save_safetensors(init)) if init is not None else None,
    }
    return make_trainer(cfg, train_loop_per_worker, extra)


def make_trainer(
    cfg: Config,
    loop: Callable[[dict], None],
    extra: dict[str, Any],
    num_to_keep: int | None = None,
    max_failures: int | None = None,
):
    """A TorchTrainer running `loop` on `cfg`'s workers; the loop gets ``{"config": cfg as JSON,
    **extra}``."""
    # heavy (ray.train: seconds): only once a run starts
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = _use_gpu(cfg)
    # mypy sees Ray's V1 config classes (see pyproject); at run time these are the V2 ones.
    return TorchTrainer(
        loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), **extra},
        torch_config=TorchConfig(
            backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.run.collective_timeout_s)
        ),
        scaling_config=ScalingConfig(
            **_scaling(cfg),
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=_storage_path(cfg),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep if num_to_keep is None else num_to_keep
            ),
            failure_config=FailureConfig(
                max_failures=cfg.run.max_failures if max_failures is None else max_failures
            ),
            worker_runtime_env={"env_vars": _worker_env(use_gpu)},
        ),
    )


def _worker_env(use_gpu: bool) -> dict[str, str]:
    """Variables set for every worker. Ray shows a worker group's runtime_env on the dashboard,
    so MLflow credentials are left out (`looks_secret`): workers on a local instance inherit
    them from this process anyway; on a cluster they come from the nodes' environment."""
    keep = ("SSL_DIST_LOG", "SSL_DIST_NO_PROGRESS", "GLOO_SOCKET_IFNAME", "DS_ACCELERATOR")
    env = {
        k: v
        for k, v in os.environ.items()
        if k in keep or (k.startswith("MLFLOW_") and not looks_secret(k))
    }
    if not use_gpu:
        # DeepSpeed probes for an accelerator at import; pin its CPU one when no GPU is used.
        env.setdefault("DS_ACCELERATOR", "cpu")
    # Ray Train patches `print` in its workers to write through its logger as well as to a
    # wrapped stderr: every line a worker prints reached the driver's log twice.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return env


def resolve_paths(cfg: Config) -> Config:
    """Local relative paths made absolute: Ray workers run in their own working directory."""

    def absolute(p: str) -> str:
        return p if "://" in p or p.startswith("pipe:") else str(Path(p).expanduser().resolve())

    cfg = cfg.model_copy(deep=True)
    cfg.data.manifest = absolute(cfg.data.manifest)
    if cfg.data.shards is not None:
        cfg.data.shards = [absolute(u) for u in cfg.data.shards]
    cfg.run.storage_path = _storage_path(cfg)
    if cfg.tracking.enabled:
        try:
            cfg.tracking.uri = tracking.resolve_uri(cfg.tracking.uri, cfg.run.storage_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg


RESUME_FIXED = ("method.name", "model", "zero.stage", "data.channels", "data.image_size")
"""Config parts a continued run must keep: the saved engine state only fits the same ones."""


def check_continuation(cfg: Config) -> None:
    """Same run name again continues the run: refuse (exit 2) when the saved checkpoints were
    made by a config they cannot be loaded into. Only local storage can be inspected here."""
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    if "://" in cfg.run.storage_path or not run_dir.is_dir():
        return
    done = sorted(d for d in run_dir.glob("checkpoint_*") if is_complete(d))
    if not done:
        return
    saved = read_config(done[-1] / CONFIG)
    old, new = flatten(saved), flatten(cfg)
    changed = [k for k in new if k.startswith(RESUME_FIXED) and old.get(k) != new[k]]
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(
            f"run {cfg.run.name!r} in {cfg.run.storage_path} has checkpoints made with a different "
            f"{diffs}; use a new run.name to start fresh"
        )


def pretrain(cfg: Config) -> tuple[str, dict]:
    """Train, then log the encoder to MLflow and register it; return the final checkpoint's
    path and the final metrics (with ``mlflow`` = run id, model URI and version, when logged)."""
    cfg = resolve_paths(cfg)
    open_shards(cfg.data)  # bad manifest / shard list: exit 2 here, before any worker starts
    check_continuation(cfg)
    try:
        zero.check_supported(cfg.zero, cfg.optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    init = warm_start(cfg)
    run_id = tracking.start_run(cfg)
    connect(cfg)
    result = build_trainer(cfg, run_id, init).fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    metrics = dict(result.metrics or {})
    with result.checkpoint.as_directory() as d:
        logged = finish(cfg, Path(d), metrics)
    if logged:
        metrics["mlflow"] = logged
    return result.checkpoint.path, metrics


def finish(cfg: Config, checkpoint_dir: Path, metrics: dict) -> dict | None:
    """Tracking's end of the run (:func:`ssl_dist.tracking.finish_run`), handed a sample of the
    val split's features and an input example when the run reached its last step. Bounded and
    never raising, like tracking: an encoding failure costs the figure and the signature."""
    if not cfg.tracking.enabled:
        return None
    sample = None
    if metrics.get("step", 0) >= metrics.get("total_steps", 0):
        sample = tracking.bounded(
            lambda: encoder_sample(cfg, checkpoint_dir),
            tracking.FINISH_TIMEOUT_S,
            "encode the val split for the model's example",
        )
    return tracking.finish_run(cfg, checkpoint_dir, metrics, sample)
