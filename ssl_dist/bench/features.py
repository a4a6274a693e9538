"""The quality bench's encoders and how they are scored: every split decoded once into memory,
frozen features of the evaluation view, the linear probe and the kNN monitor on them (raw pixels
too), the random-init and checkpoint encoders, and the supervised reference encoder trained on the
same step loop as pretraining (see :mod:`ssl_dist.bench.quality`)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.artifact import read_artifact
from ssl_dist.atomic import write_atomic
from ssl_dist.bench.report import torch_threads
from ssl_dist.config import Config, ConfigError, DataConfig
from ssl_dist.data.shards import manifest_sha256
from ssl_dist.data.stream import open_shards, stream
from ssl_dist.data.views import views_for
from ssl_dist.evaluate.knn import knn_predict
from ssl_dist.evaluate.probe import WD_GRID, probe_features
from ssl_dist.methods.classify import Classifier, ClassifyInputs
from ssl_dist.optim import param_groups
from ssl_dist.train.parts import build_model, view_seed
from ssl_dist.train.runtime import Position, Recorder, Schedule, TimeLimit, TorchBackend, run_steps

EVAL_BATCH = 500
"""Images per forward pass when encoding (BN in eval mode: any size gives the same features)."""


@dataclass
class Labelled:
    images: Tensor
    """uint8 ``[N, C, H, W]`` at the recipe's image size (decoded as the stream decodes)."""
    labels: Tensor


def load_split(data: DataConfig, split: str) -> Labelled:
    """Every sample of `split`, decoded once into memory (Fashion-MNIST: 55 MB at 28 px)."""
    xs, ys = [], []
    cfg = data.model_copy(update={"batch_size": 1000})
    for batch in stream(cfg, 0, 1, 0, split=split, partial=True):
        xs.append(batch.eval_images())
        ys.append(batch.labels)
    if not ys:
        raise ConfigError(f"split {split!r} of {data.manifest} is empty")
    return Labelled(torch.cat(xs), torch.cat(ys))


@torch.no_grad()
def encode(encoder: nn.Module, images: Tensor, views: Any, batch: int = EVAL_BATCH) -> Tensor:
    """Frozen features of the un-augmented view (``views.plain``), BN in eval mode."""
    was = encoder.training
    encoder.eval()
    try:
        return torch.cat([encoder(views.plain(x)).float() for x in images.split(batch)])
    finally:
        encoder.train(was)


def raw_pixels(images: Tensor, views: Any, size: int | None = None) -> Tensor:
    """Raw pixels, normalised like the encoder's input (optionally resized), flattened."""
    x = views.plain(images)
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.flatten(1)


def evaluate_features(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    max_iter: int = 300,
) -> dict[str, Any]:
    """The project's linear probe and the kNN monitor on the same features."""
    start = time.perf_counter()
    r = probe_features(train_x, train_y, val_x, val_y, num_classes, max_iter=max_iter)
    probe_s = time.perf_counter() - start
    knn = knn_predict(train_x, train_y, val_x, num_classes).argmax(1)
    return {
        "probe_top1": r["top1"],
        "probe_top5": r["top5"],
        "probe_wd": r["weight_decay"],
        "knn_top1": (knn == val_y).float().mean().item(),
        "feature_dim": r["feature_dim"],
        "probe_s": probe_s,
    }


class Evaluator:
    """Holds the labelled splits and the plain view; scores encoders and raw pixels.

    With `cache_dir`, the two baselines that do not depend on training (raw pixels, random
    init) are kept in ``baselines.json`` keyed by the manifest digest and everything that
    determines them, and reused by later runs (marked ``cached``)."""

    def __init__(self, cfg: Config, threads: int = 1, cache_dir: Path | None = None) -> None:
        self.cfg = cfg
        shards = open_shards(cfg.data)
        self.manifest_sha256 = manifest_sha256(cfg.data.manifest)
        self.num_classes = len(shards.manifest.classes)
        self.manifest = shards.manifest
        self.views = views_for(cfg, shards.manifest)
        self.threads = threads
        self.cache = cache_dir / "baselines.json" if cache_dir is not None else None
        start = time.perf_counter()
        self.train = load_split(cfg.data, cfg.data.split)
        self.val = load_split(cfg.data, cfg.data.val_split)
        self.load_s = time.perf_counter() - start

    def _score(self, train_x: Tensor, val_x: Tensor) -> dict[str, Any]:
        return evaluate_features(
            train_x, self.train.labels, val_x, self.val.labels, self.num_classes
        )

    def encoder(self, encoder: nn.Module, cfg: Config | None = None) -> dict[str, Any]:
        """Scores of `encoder`'s frozen features, on the plain view at `cfg`'s image size (an
        encoder trained at another size than the bench's; default the bench's view)."""
        views = self.views
        if cfg is not None and cfg.data.image_size != self.cfg.data.image_size:
            views = views_for(cfg, self.manifest)
        with torch_threads(self.threads):
            start = time.perf_counter()
            tx = encode(encoder, self.train.images, views)
            vx = encode(encoder, self.val.images, views)
            encode_s = time.perf_counter() - start
            return {**self._score(tx, vx), "encode_s": encode_s}

    def pixels(self, size: int | None = None) -> dict[str, Any]:
        def score() -> dict[str, Any]:
            with torch_threads(self.threads):
                tx = raw_pixels(self.train.images, self.views, size)
                vx = raw_pixels(self.val.images, self.views, size)
                return self._score(tx, vx)

        return self._cached({"kind": "raw", "size": size or self.cfg.data.image_size}, score)

    def random_init(self) -> dict[str, Any]:
        key = {
            "kind": "init",
            "model": self.cfg.model.model_dump(mode="json"),
            "method": self.cfg.method.name,
            "seed": self.cfg.run.seed,
            "size": self.cfg.data.image_size,
            "channels": self.cfg.data.channels,
        }
        return self._cached(key, lambda: self.encoder(init_encoder(self.cfg)))

    def _cached(self, key: dict[str, Any], score: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.cache is None:
            return score()
        full = {
            **key,
            "manifest": self.manifest_sha256,
            "wd_grid": list(WD_GRID),
            "view": self.cfg.views.normalize,
        }
        digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]
        try:
            saved = json.loads(self.cache.read_text())
        except (OSError, ValueError):
            saved = {}
        if digest in saved:
            return {**saved[digest], "cached": True}
        result = score()
        saved[digest] = result
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.cache, json.dumps(saved, indent=1))
        return result


def init_encoder(cfg: Config) -> nn.Module:
    """The encoder exactly as training starts it (seed, method constructor, zero-init)."""
    return build_model(cfg).encoder


def checkpoint_encoder(directory: Path) -> nn.Module:
    """The encoder of a checkpoint (its artifact)."""
    return read_artifact(directory).build_encoder()


@dataclass
class Supervised:
    encoder: nn.Module
    steps: int
    seconds: float
    epochs: float
    head_top1: float
    images_s: float


def train_supervised(
    cfg: Config,
    train: Labelled,
    val: Labelled,
    views: Any,
    budget_s: float,
    threads: int = 2,
    batch_size: int = 256,
    lr: float = 0.2,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> Supervised:
    """The same encoder (same init) + the fine-tuning head (:class:`Classifier`), cross-entropy,
    SGD with Nesterov momentum, trained through the project's step loop in this process
    (`threads` threads): random resized crop (scale 0.5-1) and flip on the device; warm-up and
    cosine (:func:`ssl_dist.optim.lr_at`) over the steps that fit `budget_s`, estimated from the
    first steps' speed; a time limit stops it when the budget is spent."""
    with torch_threads(threads):
        encoder = init_encoder(cfg)
        model = Classifier(encoder, int(train.labels.max()) + 1)
        size = cfg.data.image_size
        aug = nn.Sequential(
            K.RandomResizedCrop((size, size), scale=(0.5, 1.0)), K.RandomHorizontalFlip()
        )
        opt = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=0.9, nesterov=True)
        n = len(train.labels)
        batch_size = min(batch_size, n)

        def batches(epoch: int):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            for i in range(0, n - batch_size + 1, batch_size):
                idx = order[i : i + batch_size]
                yield Labelled(train.images[idx], train.labels[idx])

        backend = TorchBackend(model, opt, precision=cfg.zero.precision)
        inputs = ClassifyInputs(views, "cpu", aug)
        state, recorder, warmup, probe_steps = Position(), Recorder(), 10, 8
        start = time.perf_counter()
        limit = TimeLimit(time.monotonic() + budget_s)

        def run(total: int) -> None:
            schedule = Schedule(total, lr, warmup)
            run_steps(
                backend,
                inputs,
                batches,
                schedule,
                state,
                [limit, recorder],
                seed=lambda epoch, i: view_seed(seed, epoch, i, 0),
            )

        run(probe_steps)  # all of it warm-up: the schedule's length does not matter yet
        elapsed = time.perf_counter() - start
        if state.stopped is None:  # fit the cosine to the time that is left
            run(probe_steps + int((budget_s - elapsed) / (elapsed / probe_steps)))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            model.eval()
            logits = torch.cat([model.logits(views.plain(x)) for x in val.images.split(EVAL_BATCH)])
        top1 = (logits.argmax(1) == val.labels).float().mean().item()
    images = recorder.images
    return Supervised(encoder, state.step, seconds, images / n, top1, images / seconds)
