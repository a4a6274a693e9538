"""`ssl-dist pretrain`: build a Ray Train V2 TorchTrainer from the config and run it."""

from __future__ import annotations

import os
from pathlib import Path

from ssl_dist.config import Config, ConfigError
from ssl_dist.data.stream import open_shards


def _storage_path(cfg: Config) -> str:
    path = cfg.run.storage_path
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _use_gpu(cfg: Config) -> bool:
    import ray

    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.scaling.use_gpu == "yes"


def connect(cfg: Config) -> None:
    """Join `run.ray_address` (auto, ray://...) or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    if cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def build_trainer(cfg: Config, mlflow_run_id: str | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ssl_dist.train.loop import train_loop_per_worker

    use_gpu = _use_gpu(cfg)
    if not use_gpu and cfg.zero.precision != "fp32":
        raise ConfigError(
            f"zero.precision={cfg.zero.precision} needs GPUs; this run has none: use fp32"
        )
    num_workers = cfg.scaling.num_workers
    # mypy sees Ray's V1 config classes (see pyproject); at run time these are the V2 ones.
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id},
        torch_config=TorchConfig(
            backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.run.collective_timeout_s)
        ),
        scaling_config=ScalingConfig(
            num_workers=num_workers if isinstance(num_workers, int) else tuple(num_workers),
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=_storage_path(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": _worker_env(use_gpu)},
        ),
    )


def _worker_env(use_gpu: bool) -> dict[str, str]:
    keep = ("SSL_DIST_LOG", "SSL_DIST_NO_PROGRESS", "GLOO_SOCKET_IFNAME", "DS_ACCELERATOR")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("MLFLOW_")}
    if not use_gpu:
        # DeepSpeed probes for an accelerator at import; pin its CPU one when no GPU is used.
        env.setdefault("DS_ACCELERATOR", "cpu")
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
        from ssl_dist.tracking import resolve_uri

        try:
            cfg.tracking.uri = resolve_uri(cfg.tracking.uri, cfg.run.storage_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg


RESUME_FIXED = ("method.name", "model", "zero.stage", "data.channels", "data.image_size")
"""Config parts a continued run must keep: the saved engine state only fits the same ones."""


def check_continuation(cfg: Config) -> None:
    """Same run name again continues the run: refuse (exit 2) when the saved checkpoints were
    made by a config they cannot be loaded into. Only local storage can be inspected here."""
    import yaml

    from ssl_dist.config import flatten
    from ssl_dist.train.checkpoint import is_complete

    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    if "://" in cfg.run.storage_path or not run_dir.is_dir():
        return
    done = sorted(d for d in run_dir.glob("checkpoint_*") if is_complete(d))
    if not done:
        return
    saved = Config.model_validate(yaml.safe_load((done[-1] / "config.yaml").read_text()))
    old, new = flatten(saved), flatten(cfg)
    changed = [k for k in new if k.startswith(RESUME_FIXED) and old.get(k) != new[k]]
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(
            f"run {cfg.run.name!r} in {cfg.run.storage_path} has checkpoints made with a different "
            f"{diffs}; use a new run.name to start fresh"
        )


def run_pretrain(cfg: Config) -> Path | str:
    """Train and return the path of the final checkpoint."""
    return pretrain(cfg)[0]


def pretrain(cfg: Config) -> tuple[str, dict]:
    """Train, then log the encoder to MLflow and register it; return the final checkpoint's
    path and the final metrics (with ``mlflow`` = run id, model URI and version, when logged)."""
    cfg = resolve_paths(cfg)
    open_shards(cfg.data)  # bad manifest / shard list: exit 2 here, before any worker starts
    check_continuation(cfg)
    from ssl_dist.dist import zero

    try:
        zero.check_supported(cfg.zero, cfg.optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from ssl_dist import tracking

    run_id = tracking.start_run(cfg)
    connect(cfg)
    result = build_trainer(cfg, run_id).fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    metrics = dict(result.metrics or {})
    with result.checkpoint.as_directory() as d:
        logged = tracking.finish_run(cfg, Path(d), metrics)
    if logged:
        metrics["mlflow"] = logged
    return result.checkpoint.path, metrics
