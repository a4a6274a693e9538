"""`ssl-dist finetune`: how good a pretrained encoder is on a labelled shard set.

Two modes:

* ``linear``: the linear probe. The frozen encoder encodes every train and val image once (the
  plain, un-augmented view); features are standardised with the train mean / std; a linear
  classifier is fitted by full-batch L-BFGS on cross-entropy plus an L2 penalty (zero init, so
  the fit is deterministic: the problem is convex). The penalty is chosen from a small grid on a
  seeded held-out 20% of train, the classifier is refitted on all of train with it, and top-1
  (and top-5 with more than 5 classes) is measured on val.
* ``full``: the encoder plus a new head (parameter-free BatchNorm, then linear) trained end to
  end with cross-entropy on Ray Train workers, through the same DeepSpeed engine as pretraining
  (:func:`ssl_dist.dist.zero.build_engine`, the source's ZeRO stage and precision; SGD with
  momentum, a short warm-up and cosine decay). Each worker streams its share of train (exact
  mode: every sample once per epoch) and feeds the plain view. At the end rank 0 evaluates the
  consolidated model on val and reports it with a checkpoint holding ``encoder.safetensors``
  (the fine-tuned encoder), ``classifier.safetensors`` (encoder + head), ``config.yaml`` and
  ``results.json``.

:func:`run_finetune` loads the source (:mod:`ssl_dist.evaluate.source`), runs a mode, and logs
an MLflow run in the experiment ``ssl-dist-finetune`` tagged with the source's lineage; when the
source is a registered model version, that version gets ``<mode>_top1`` / ``<mode>_top5`` /
``<mode>_data`` tags. Tracking never fails the job: a slow or dead server costs a warning.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.config import Config, ConfigError, DataConfig, OptimConfig
from ssl_dist.data.shards import MANIFEST
from ssl_dist.evaluate.source import EncoderSource
from ssl_dist.methods.classify import Classifier
from ssl_dist.train.runtime import Hook

MODES = ("linear", "full")
EXPERIMENT = "ssl-dist-finetune"
WD_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
"""L2 penalties the linear probe chooses from (on the mean cross-entropy)."""
HOLDOUT = 0.2
"""Share of train held out to choose the penalty."""
EVAL_BATCH = 256
"""Images per forward pass when encoding for evaluation (BN in eval mode: any size gives the
same features)."""
CLASSIFIER = "classifier.safetensors"
RESULTS = "results.json"
TAG_PREFIX = "ssl_dist.source_"


# ---------------------------------------------------------------- shared pieces


def manifest_path(data_dir: str | Path) -> str:
    """The manifest of a shard directory (or the manifest file itself, or a URL to it)."""
    s = str(data_dir)
    if "://" in s:
        return s if s.endswith(".json") else f"{s.rstrip('/')}/{MANIFEST}"
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".json":
        return str(p.resolve())
    if not p.is_dir():
        raise ConfigError(f"data {s!r} does not exist (a shard directory with {MANIFEST})")
    if not (p / MANIFEST).is_file():
        raise ConfigError(f"data {s!r} has no {MANIFEST}: write it with `ssl-dist data prepare`")
    return str((p / MANIFEST).resolve())


def data_config(cfg: Config, manifest: str, batch_size: int | None = None) -> DataConfig:
    """The source's data config (image size, channels, split names) on another shard set."""
    tree = cfg.data.model_dump(mode="json")
    tree.update(manifest=manifest, shards=None, allow_unsafe=False, mode="exact",
                steps_per_epoch=None)  # fmt: skip
    if batch_size is not None:
        tree["batch_size"] = batch_size
    return DataConfig.model_validate(tree)


def build_source_encoder(cfg: Config, tensors: dict[str, Tensor]) -> nn.Module:
    """The pretraining config's encoder with the source's weights (strict)."""
    from ssl_dist.models import build_encoder

    encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    try:
        encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"the weights do not fit the {cfg.model.encoder} encoder of config.yaml: {first}"
        ) from None
    return encoder


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hit.float().mean().item()


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------- linear probe


def fit_linear(
    x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int = 300
) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS from zero (deterministic).

    Minimises ``mean CE + weight_decay / 2 * ||W||^2`` (the bias is not penalised).
    """
    lin = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(
        lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
        line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9,
    )  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 0.5 * weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # type: ignore[no-untyped-call]
    return lin.requires_grad_(False)


def probe_features(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
    wd_grid: Sequence[float] = WD_GRID, seed: int = 0, max_iter: int = 300,
) -> dict[str, Any]:  # fmt: skip
    """Choose the penalty on a held-out 20% of train, refit on all of train, score val."""
    if len(train_y) < 5 or len(val_y) == 0:
        raise ConfigError(
            f"the linear probe needs labelled train and val samples ({len(train_y)} train, "
            f"{len(val_y)} val)"
        )
    if not wd_grid:
        raise ValueError("wd_grid is empty")
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, round(HOLDOUT * len(train_y)))
    hold, fit = perm[:n_hold], perm[n_hold:]
    scores: dict[float, tuple[float, float]] = {}
    for wd in wd_grid:
        lin = fit_linear(tx[fit], train_y[fit], num_classes, wd, max_iter)
        logits = lin(tx[hold])
        scores[wd] = (topk_accuracy(logits, train_y[hold], 1),
                      F.cross_entropy(logits, train_y[hold]).item())  # fmt: skip
    # Best held-out top-1; ties go to the lower held-out loss.
    best = max(wd_grid, key=lambda w: (scores[w][0], -scores[w][1]))
    lin = fit_linear(tx, train_y, num_classes, best, max_iter)
    logits = lin(vx)
    out: dict[str, Any] = {
        "top1": topk_accuracy(logits, val_y, 1),
        "top5": topk_accuracy(logits, val_y, 5) if num_classes > 5 else None,
        "weight_decay": best,
        "holdout_top1": {str(w): scores[w][0] for w in wd_grid},
        "train_top1": topk_accuracy(lin(tx), train_y, 1),
        "n_train": len(train_y),
        "n_val": len(val_y),
        "num_classes": num_classes,
        "feature_dim": int(train_x.shape[1]),
    }
    return out


def linear_probe(
    source: EncoderSource,
    data_dir: str | Path,
    *,
    wd_grid: Sequence[float] = WD_GRID,
    seed: int = 0,
    max_iter: int = 300,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Linear-probe accuracy of the source's frozen encoder on the shard set `data_dir`.

    Args:
        source: The encoder and its pretraining config (image size, channels, split names).
        data_dir: Shard directory with ``manifest.json`` (the config's train and val splits).
        wd_grid: L2 penalties to choose from on a held-out 20% of train.
        seed: Seed of the held-out split.
        max_iter: L-BFGS iterations per fit.
        device: Where to encode (default: CUDA when available).

    Returns:
        ``top1``, ``top5`` (None with 5 classes or fewer), ``weight_decay`` (chosen),
        ``holdout_top1`` per penalty, ``train_top1``, ``n_train``, ``n_val``, ``num_classes``,
        ``feature_dim``, ``seconds``, ``data`` (the manifest).
    """
    from ssl_dist.data.stream import open_shards
    from ssl_dist.evaluate.knn import extract_features
    from ssl_dist.train.parts import build_views

    start = time.perf_counter()
    manifest = manifest_path(data_dir)
    data = data_config(source.cfg, manifest, batch_size=EVAL_BATCH)
    shards = open_shards(data)
    cfg = source.cfg.model_copy(update={"data": data})
    views = build_views(cfg, shards.manifest)
    dev = torch.device(device) if device is not None else _device()
    encoder = build_source_encoder(source.cfg, source.tensors).to(dev)
    views = views.to(dev)
    train_x, train_y = extract_features(encoder, data, data.split, views, dev)
    val_x, val_y = extract_features(encoder, data, data.val_split, views, dev)
    num_classes = len(shards.manifest.classes)
    out = probe_features(train_x, train_y, val_x, val_y, num_classes, wd_grid, seed, max_iter)
    out.update(seconds=time.perf_counter() - start, data=manifest, wd_grid=list(wd_grid))
    return out


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
        name="sgd", lr=lr, lr_scaling="none", weight_decay=weight_decay, momentum=0.9,
        warmup_steps=0, min_lr_ratio=0.0, grad_clip=0.0, grad_accum=1,
    ).model_dump(mode="json")  # fmt: skip
    workers = num_workers or source.cfg.scaling.num_workers
    # An elastic [min, max] pretraining setting: fine-tune on the guaranteed minimum.
    tree["scaling"]["num_workers"] = workers if isinstance(workers, int) else int(workers[0])
    tree["tracking"]["enabled"] = False  # the driver logs the fine-tune run
    tree["run"].update(name=name, storage_path=storage_path, epochs=epochs, max_steps=None,
                       stop_at_step=None, seed=seed, max_failures=0,
                       ray_address=ray_address or source.cfg.run.ray_address)  # fmt: skip
    try:
        return Config.model_validate(tree)
    except Exception as e:
        raise ConfigError(f"invalid fine-tune settings: {e}") from None


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of ``full`` mode (every rank runs the same steps)."""
    import ray
    import ray.train
    from safetensors.torch import load as load_safetensors

    from ssl_dist.config import to_yaml
    from ssl_dist.data.stream import open_shards, stream
    from ssl_dist.dist import zero
    from ssl_dist.train import checkpoint as ckpt
    from ssl_dist.train.parts import plan_steps
    from ssl_dist.train.runtime import DeepSpeedBackend, Position, run_steps

    cfg = Config.model_validate(config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    use_cuda = cfg.scaling.use_gpu != "no" and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    shards = open_shards(cfg.data)
    plan = plan_steps(cfg, shards, world_size)
    num_classes = len(shards.manifest.classes)
    tensors = load_safetensors(ray.get(config["weights"]))  # bytes -> tensors, no pickle

    def classifier() -> Classifier:
        torch.manual_seed(cfg.run.seed)  # the same head on every rank
        return Classifier(build_source_encoder(cfg, tensors), num_classes)

    model = classifier().to(device)
    inputs = model.make_inputs(cfg, shards.manifest, device)
    engine = zero.build_engine(
        model, cfg.zero, cfg.optim, cfg.data.batch_size, world_size, plan.peak_lr
    )
    epochs = _EpochLoss(cfg.run.epochs, rank, device)
    start = time.perf_counter()
    state = run_steps(
        DeepSpeedBackend(engine),
        inputs,
        lambda epoch: stream(cfg.data, rank, world_size, epoch, cfg.run.seed, shards=shards),
        plan.schedule(cfg),
        Position(),
        [epochs],
    )
    step, mean = state.step, epochs.last
    seconds = time.perf_counter() - start
    full = zero.consolidated_state_dict(engine)  # a collective under ZeRO-3: every rank
    metrics: dict[str, Any] = {
        "steps": step, "epochs": cfg.run.epochs, "train_loss": mean, "train_seconds": seconds,
        "world_size": world_size, "global_batch": plan.global_batch,
        "train_samples_per_epoch": plan.batches_per_epoch * cfg.data.batch_size * world_size,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ssl-dist-finetune-") as tmp:
        checkpoint = None
        if rank == 0:
            assert full is not None
            final = classifier()
            final.load_state_dict(full, strict=True)
            metrics.update(evaluate(final.to(device), cfg.data, inputs.views, num_classes, device))
            d = Path(tmp)
            meta = {"encoder": cfg.model.encoder, "in_chans": str(cfg.data.channels),
                    "image_size": str(cfg.data.image_size), "finetuned": "full"}  # fmt: skip
            ckpt.save_encoder(d / ckpt.ENCODER, ckpt.encoder_state(full), meta)
            ckpt.save_encoder(d / CLASSIFIER, ckpt.encoder_state(full, prefix=""), meta)
            ckpt.write_atomic(d / "config.yaml", to_yaml(cfg))
            ckpt.write_atomic(d / RESULTS, json.dumps(metrics, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


class _EpochLoss(Hook):
    """The mean train loss of each epoch over all ranks, printed by rank 0 (a runtime hook).
    Summed on the device: no CPU-GPU sync per step; one all-reduce per epoch."""

    def __init__(self, epochs: int, rank: int, device: torch.device) -> None:
        self.epochs, self.rank = epochs, rank
        self.sum, self.batches = torch.zeros((), device=device), 0
        self.last = float("nan")

    def after_step(self, state, out) -> None:
        self.sum += out.loss.float()
        self.batches += 1

    def after_epoch(self, state) -> None:
        self._close(state.epoch, state.step)

    def after_run(self, state) -> None:
        if self.batches:  # the run ended inside an epoch (its step budget)
            self._close(state.epoch + 1, state.step)

    def _close(self, epoch: int, step: int) -> None:
        from ssl_dist.dist import collectives

        self.last = collectives.all_reduce_mean(self.sum / max(self.batches, 1)).item()
        self.sum.zero_()
        self.batches = 0
        if self.rank == 0:
            print(f"finetune epoch {epoch}/{self.epochs}: step {step}, train loss "
                  f"{self.last:.4f}", file=sys.stderr)  # fmt: skip


@torch.no_grad()
def evaluate(
    model: Classifier, data: DataConfig, views: Any, num_classes: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Top-1 / top-5 of a classifier on the val split (one process reads it all)."""
    from ssl_dist.data.stream import stream

    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in stream(data, 0, 1, 0, split=data.val_split, partial=True):
            logits.append(model.logits(views.plain(batch.images.to(device))).float().cpu())
            labels.append(batch.labels)
    finally:
        model.train(was_training)
    if not logits:
        raise ConfigError(f"split {data.val_split!r} of {data.manifest} is empty")
    z, y = torch.cat(logits), torch.cat(labels)
    return {
        "top1": topk_accuracy(z, y, 1),
        "top5": topk_accuracy(z, y, 5) if num_classes > 5 else None,
        "n_val": len(y),
    }


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
    import ray
    from safetensors.torch import save as save_safetensors

    from ssl_dist.data.stream import open_shards
    from ssl_dist.dist import zero
    from ssl_dist.train.driver import connect, make_trainer, resolve_paths
    from ssl_dist.train.parts import plan_steps

    if epochs < 1 or lr <= 0:
        raise ConfigError(f"epochs must be >= 1 and lr > 0 (got {epochs}, {lr})")
    start = time.perf_counter()
    manifest = manifest_path(data_dir)
    run_name = name or f"finetune-{datetime.now():%Y%m%d-%H%M%S-%f}"
    cfg = finetune_config(
        source, manifest, epochs=epochs, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, num_workers=num_workers, storage_path=storage_path,
        name=run_name, seed=source.cfg.run.seed if seed is None else seed,
        ray_address=ray_address,
    )  # fmt: skip
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
    trainer = make_trainer(cfg, finetune_loop_per_worker, {"weights": weights}, num_to_keep=1,
                           max_failures=0)  # fmt: skip
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("fine-tuning finished without a checkpoint")
    out = dict(result.metrics or {})
    out.update(
        n_train=shards.manifest.split(cfg.data.split).samples, seconds=time.perf_counter() - start,
        checkpoint=result.checkpoint.path, data=manifest, lr=lr, weight_decay=weight_decay,
        batch_size=cfg.data.batch_size, num_workers=workers, zero_stage=cfg.zero.stage,
        run_name=run_name,
    )  # fmt: skip
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
    from mlflow.entities import Metric, Param, RunTag

    from ssl_dist import tracking

    client = tracking.client(uri)
    exp = tracking.experiment_id(client, EXPERIMENT, uri)
    tags = {**lineage_tags(source), "ssl_dist.mode": mode, "ssl_dist.data": results["data"]}
    name = source.lineage.get("model_name")
    run_name = f"{mode}-{name}-v{source.lineage['model_version']}" if name else mode
    run = client.create_run(exp, run_name=run_name, tags=tags)
    run_id: str = run.info.run_id
    now = int(time.time() * 1000)
    params = {"mode": mode, "data": results["data"], "source_uri": source.lineage.get("uri", ""),
              "encoder": source.cfg.model.encoder, "image_size": source.cfg.data.image_size,
              "channels": source.cfg.data.channels}  # fmt: skip
    keys = ("wd_grid", "weight_decay", "epochs", "lr", "batch_size", "num_workers", "zero_stage")
    params.update({k: results[k] for k in keys if results.get(k) is not None})
    numeric = ("top1", "top5", "train_top1", "train_loss", "seconds", "n_train", "n_val", "steps")
    metrics = [Metric(k, float(results[k]), now, 0) for k in numeric
               if isinstance(results.get(k), int | float)]  # fmt: skip
    client.log_batch(
        run_id, metrics=metrics,
        params=[Param(k, _tag_value(v)[:6000]) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )  # fmt: skip
    client.log_dict(run_id, results, RESULTS)
    client.set_terminated(run_id)
    return run_id


def tag_model_version(uri: str, source: EncoderSource, mode: str, results: dict[str, Any]) -> bool:
    """``<mode>_top1`` / ``<mode>_top5`` / ``<mode>_data`` on the source's registered version."""
    from ssl_dist import tracking

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
    from ssl_dist import tracking
    from ssl_dist.evaluate.source import DEFAULT_STORAGE, load_source

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
            source, data_dir, epochs=epochs, lr=lr, batch_size=batch_size,
            num_workers=num_workers, storage_path=storage_path, seed=seed,
        )  # fmt: skip
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
        )  # fmt: skip
    )
    return results


def summary(results: dict[str, Any]) -> str:
    """One line for the terminal."""
    top5 = f" (top-5 {results['top5']:.1%})" if results.get("top5") is not None else ""
    counts = f"{results['n_train']} train / {results['n_val']} val"
    if results["mode"] == "linear":
        return (f"linear probe top-1 on val: {results['top1']:.1%}{top5}, weight decay "
                f"{results['weight_decay']:g}, {counts}")  # fmt: skip
    return (f"full fine-tune top-1 on val: {results['top1']:.1%}{top5}, {results['epochs']} "
            f"epochs on {results['num_workers']} workers, {counts}")  # fmt: skip
