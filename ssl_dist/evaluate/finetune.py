"""`ssl-dist finetune`: how good a pretrained encoder is on a labelled shard set.

Two modes:

* ``linear``: the linear probe on frozen features (:mod:`ssl_dist.evaluate.probe`);
* ``full``: the encoder plus a new head (parameter-free BatchNorm, then linear) trained end to
  end with cross-entropy on Ray Train workers (:mod:`ssl_dist.train.finetune`), through the same
  DeepSpeed engine as pretraining (:func:`ssl_dist.dist.zero.build_engine`, the source's ZeRO
  stage and precision; SGD with momentum, a short warm-up and cosine decay).

:func:`run_finetune` loads the source (:mod:`ssl_dist.evaluate.source`), runs a mode, and logs
an MLflow run in the experiment ``ssl-dist-finetune`` tagged with the source's lineage; when the
source is a registered model version, that version gets ``<mode>_top1`` / ``<mode>_top5`` /
``<mode>_data`` tags. Tracking never fails the job: a slow or dead server costs a warning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_safetensors

from ssl_dist import tracking
from ssl_dist.config import Config, ConfigError, OptimConfig
from ssl_dist.data.stream import open_shards
from ssl_dist.dist import zero
from ssl_dist.evaluate.probe import WD_GRID, data_config, linear_probe, manifest_path
from ssl_dist.evaluate.source import DEFAULT_STORAGE, EncoderSource, load_source
from ssl_dist.train.driver import connect, make_trainer, resolve_paths
from ssl_dist.train.finetune import RESULTS, finetune_loop_per_worker
from ssl_dist.train.parts import plan_steps

MODES = ("linear", "full")
EXPERIMENT = "ssl-dist-finetune"
TAG_PREFIX = "ssl_dist.source_"


# ---------------------------------------------------------------- full fine-tuning


def finetune_config(
    source: EncoderSource,
    manifest: str,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int | None,
    num_workers: int | None,
    storage_path: str,
    name: str,
    seed: int,
    ray_address: str | None,
) -> Config:
    """The run config of a full fine-tune: the source's model, ZeRO and scaling settings; SGD
    with momentum at `lr` (not scaled with the batch), cosine decay; exact-mode epochs."""
    tree = source.cfg.model_dump(mode="json")
    tree["data"] = data_config(source.cfg, manifest, batch_size).model_dump(mode="json")
    tree["optim"] = OptimConfig(
        name="sgd",
        lr=lr,
        lr_scaling="none",
        weight_decay=weight_decay,
        momentum=0.9,
        warmup_steps=0,
        min_lr_ratio=0.0,
        grad_clip=0.0,
        grad_accum=1,
    ).model_dump(mode="json")
    workers = num_workers or source.cfg.scaling.num_workers
    # An elastic [min, max] pretraining setting: fine-tune on the guaranteed minimum.
    tree["scaling"]["num_workers"] = workers if isinstance(workers, int) else int(workers[0])
    tree["tracking"]["enabled"] = False  # the driver logs the fine-tune run
    tree["run"].update(
        name=name,
        storage_path=storage_path,
        epochs=epochs,
        max_steps=None,
        stop_at_step=None,
        seed=seed,
        max_failures=0,
        ray_address=ray_address or source.cfg.run.ray_address,
    )
    try:
        return Config.model_validate(tree)
    except Exception as e:
        raise ConfigError(f"invalid fine-tune settings: {e}") from None


def full_finetune(
    source: EncoderSource,
    data_dir: str | Path,
    *,
    epochs: int = 5,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    num_workers: int | None = None,
    storage_path: str = "work/runs",
    name: str | None = None,
    seed: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Fine-tune encoder + a new linear head on Ray Train workers through DeepSpeed.

    Args:
        source: The pretrained encoder and its config (model, ZeRO stage, precision, workers).
        data_dir: Shard directory with ``manifest.json`` (train and val splits).
        epochs: Passes over train.
        lr: Peak SGD learning rate (cosine decay to 0, 5% warm-up), not scaled with the batch.
        weight_decay: SGD weight decay (BN and bias excluded).
        batch_size: Images per worker per step (default: the pretraining one).
        num_workers: Ray Train workers (default: the pretraining ``scaling.num_workers``).
        storage_path: Where Ray keeps the run and its checkpoint.
        name: Ray run name (default ``finetune-<time>``: a new run each time).
        seed: Seed of the head's init and the data order (default the pretraining seed).
        ray_address: Ray cluster to join (default the pretraining ``run.ray_address``, else a
            local instance; an already initialised Ray is used as it is).

    Returns:
        ``top1``, ``top5``, ``n_val``, ``n_train``, ``steps``, ``train_loss``, ``world_size``,
        ``global_batch``, ``seconds``, ``checkpoint`` (path of the fine-tuned checkpoint),
        ``data``, and the settings.
    """
    import ray  # heavy (seconds): only for this mode

    if epochs < 1 or lr <= 0:
        raise ConfigError(f"epochs must be >= 1 and lr > 0 (got {epochs}, {lr})")
    start = time.perf_counter()
    manifest = manifest_path(data_dir)
    run_name = name or f"finetune-{datetime.now():%Y%m%d-%H%M%S-%f}"
    cfg = finetune_config(
        source,
        manifest,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        num_workers=num_workers,
        storage_path=storage_path,
        name=run_name,
        seed=source.cfg.run.seed if seed is None else seed,
        ray_address=ray_address,
    )
    cfg = resolve_paths(cfg)
    workers = cfg.scaling.num_workers
    assert isinstance(workers, int)
    shards = open_shards(cfg.data)  # a bad manifest or too few shards: exit 2 before Ray starts
    plan = plan_steps(cfg, shards, workers)
    cfg.optim.warmup_steps = max(1, plan.total_steps // 20)
    try:
        zero.check_supported(cfg.zero, cfg.optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    connect(cfg)
    weights = ray.put(save_safetensors(source.tensors))  # plain bytes to the workers
    # One checkpoint (the result), no restarts: a failed fine-tune is simply run again.
    trainer = make_trainer(
        cfg, finetune_loop_per_worker, {"weights": weights}, num_to_keep=1, max_failures=0
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("fine-tuning finished without a checkpoint")
    out = dict(result.metrics or {})
    out.update(
        n_train=shards.manifest.split(cfg.data.split).samples,
        seconds=time.perf_counter() - start,
        checkpoint=result.checkpoint.path,
        data=manifest,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=cfg.data.batch_size,
        num_workers=workers,
        zero_stage=cfg.zero.stage,
        run_name=run_name,
    )
    return out


# ---------------------------------------------------------------- the command


def _tag_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def lineage_tags(source: EncoderSource) -> dict[str, str]:
    """``ssl_dist.source_uri`` / ``_model_name`` / ``_model_version`` / ``_run_id`` (known ones)."""
    return {f"{TAG_PREFIX}{k}": v for k, v in source.lineage.items() if v}


def log_finetune_run(uri: str, source: EncoderSource, mode: str, results: dict[str, Any]) -> str:
    """One MLflow run in the experiment ``ssl-dist-finetune``: params, metrics, lineage tags and
    ``results.json``; returns its id."""
    from mlflow.entities import Metric, Param, RunTag  # heavy (mlflow): only when logging

    client = tracking.client(uri)
    exp = tracking.experiment_id(client, EXPERIMENT, uri)
    tags = {**lineage_tags(source), "ssl_dist.mode": mode, "ssl_dist.data": results["data"]}
    name = source.lineage.get("model_name")
    run_name = f"{mode}-{name}-v{source.lineage['model_version']}" if name else mode
    run = client.create_run(exp, run_name=run_name, tags=tags)
    run_id: str = run.info.run_id
    now = int(time.time() * 1000)
    params = {
        "mode": mode,
        "data": results["data"],
        "source_uri": source.lineage.get("uri", ""),
        "encoder": source.cfg.model.encoder,
        "image_size": source.cfg.data.image_size,
        "channels": source.cfg.data.channels,
    }
    keys = ("wd_grid", "weight_decay", "epochs", "lr", "batch_size", "num_workers", "zero_stage")
    params.update({k: results[k] for k in keys if results.get(k) is not None})
    numeric = ("top1", "top5", "train_top1", "train_loss", "seconds", "n_train", "n_val", "steps")
    metrics = [
        Metric(k, float(results[k]), now, 0)
        for k in numeric
        if isinstance(results.get(k), int | float)
    ]
    client.log_batch(
        run_id,
        metrics=metrics,
        params=[Param(k, _tag_value(v)[:6000]) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.log_dict(run_id, results, RESULTS)
    client.set_terminated(run_id)
    return run_id


def tag_model_version(uri: str, source: EncoderSource, mode: str, results: dict[str, Any]) -> bool:
    """``<mode>_top1`` / ``<mode>_top5`` / ``<mode>_data`` on the source's registered version."""
    name, version = source.lineage.get("model_name"), source.lineage.get("model_version")
    if not name or not version:
        return False
    client = tracking.client(uri)
    tags = {f"{mode}_top1": results["top1"], f"{mode}_data": results["data"]}
    if results.get("top5") is not None:
        tags[f"{mode}_top5"] = results["top5"]
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, _tag_value(v))
    return True


def run_finetune(
    model_uri: str,
    data_dir: str | Path,
    mode: str,
    tracking_uri: str | None = None,
    *,
    epochs: int = 5,
    lr: float = 0.1,
    batch_size: int | None = None,
    num_workers: int | None = None,
    storage_path: str = "work/runs",
    wd_grid: Sequence[float] = WD_GRID,
    seed: int = 0,
    log_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Load `model_uri`, evaluate it on `data_dir` in `mode`, log the result to MLflow.

    Args:
        model_uri: ``models:/name@alias``, ``models:/name/version``, ``runs:/<id>/<path>`` or a
            checkpoint directory (see :func:`ssl_dist.evaluate.source.load_source`).
        data_dir: Shard directory with ``manifest.json``.
        mode: ``linear`` (probe on frozen features) or ``full`` (fine-tune on Ray workers).
        tracking_uri: MLflow URI for the source and the log (default ``$MLFLOW_TRACKING_URI``,
            else ``sqlite:///work/runs/mlflow.db``).
        epochs, lr, batch_size, num_workers, storage_path: ``full`` mode (see
            :func:`full_finetune`).
        wd_grid, seed: ``linear`` mode (see :func:`linear_probe`); `seed` also seeds ``full``.
        log_timeout_s: Bound on each MLflow call; past it the job goes on without the log.

    Returns:
        The mode's results plus ``mode``, ``source`` (lineage) and ``mlflow_run_id`` (None when
        the log failed) and ``model_version_tagged``.

    Raises:
        ConfigError: unknown mode, missing data, a source that cannot be loaded or is refused.
    """
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {list(MODES)} (got {mode!r})")
    manifest_path(data_dir)  # a missing data dir fails before anything is downloaded
    try:
        uri = tracking.resolve_uri(tracking_uri, DEFAULT_STORAGE)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    source = load_source(model_uri, tracking_uri=uri)
    if mode == "linear":
        results = linear_probe(source, data_dir, wd_grid=wd_grid, seed=seed)
    else:
        results = full_finetune(
            source,
            data_dir,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            num_workers=num_workers,
            storage_path=storage_path,
            seed=seed,
        )
        results["epochs"] = epochs
    results.update(mode=mode, source=dict(source.lineage))
    for k in ("top1", "top5"):
        if isinstance(results.get(k), float) and not math.isfinite(results[k]):
            results[k] = None
    results["mlflow_run_id"] = tracking.bounded(
        lambda: log_finetune_run(uri, source, mode, results), log_timeout_s, "log finetune run"
    )
    results["model_version_tagged"] = bool(
        tracking.bounded(
            lambda: tag_model_version(uri, source, mode, results),
            log_timeout_s,
            "tag the model version",
        )
    )
    return results


def summary(results: dict[str, Any]) -> str:
    """One line for the terminal."""
    top5 = f" (top-5 {results['top5']:.1%})" if results.get("top5") is not None else ""
    counts = f"{results['n_train']} train / {results['n_val']} val"
    if results["mode"] == "linear":
        return (
            f"linear probe top-1 on val: {results['top1']:.1%}{top5}, weight decay "
            f"{results['weight_decay']:g}, {counts}"
        )
    return (
        f"full fine-tune top-1 on val: {results['top1']:.1%}{top5}, {results['epochs']} "
        f"epochs on {results['num_workers']} workers, {counts}"
    )
