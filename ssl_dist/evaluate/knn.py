"""kNN monitor: how well frozen features separate the classes, without training anything.

Weighted k-nearest-neighbour vote on cosine similarity, as in Wu et al. 2018 ("Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", sec. 3.4) and the kNN monitors of
the MoCo / DINO code: the bank is the labelled train split, the queries are the val split.

A bank smaller than the split is a seeded uniform sample of the whole split, drawn over the
manifest's sample counts of every shard (not the first samples in shard order: a class-sorted
shard set would put only a few classes in the bank). Only the drawn samples are decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.artifact import read_artifact
from ssl_dist.config import DataConfig
from ssl_dist.data.shardset import ShardSet
from ssl_dist.data.stream import open_shards, stream
from ssl_dist.data.views import TwoViews, views_for
from ssl_dist.models import build_encoder


def sample_positions(shards: ShardSet, n: int, seed: int = 0) -> dict[str, frozenset[int]]:
    """`n` samples drawn uniformly without replacement from the whole split, as positions in
    each shard (``{url: positions}``, shards with none left out), from the manifest's counts:
    the same draw for the same seed and manifest."""
    counts = np.asarray(shards.counts, dtype=np.int64)
    total = int(counts.sum())
    picked = np.sort(np.random.default_rng([seed, 0x6B6E6E]).choice(total, min(n, total), False))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shard = np.searchsorted(starts, picked, side="right") - 1
    keep: dict[str, set[int]] = {}
    for s, p in zip(shard.tolist(), (picked - starts[shard]).tolist(), strict=True):
        keep.setdefault(shards.urls[s], set()).add(p)
    return {url: frozenset(p) for url, p in keep.items()}


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    data: DataConfig,
    split: str,
    views: TwoViews,
    device: torch.device | str = "cpu",
    max_samples: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Encode every sample of `split` once (one process reads the whole split), or with
    `max_samples` a seeded random sample of that many drawn over all its shards
    (:func:`sample_positions`).

    Returns:
        ``(features [N, F] float32, labels [N] int64)``.
    """
    shards = open_shards(data, split)
    keep = None
    if max_samples is not None and max_samples < sum(shards.counts):
        keep = sample_positions(shards, max_samples, seed)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for batch in stream(data, 0, 1, 0, split=split, partial=True, shards=shards, keep=keep):
            x = views.plain(batch.eval_images().to(device))
            feats.append(encoder(x).float().cpu())
            labels.append(batch.labels)
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> Tensor:
    """Class scores ``[Q, num_classes]`` from a similarity-weighted vote of the k nearest."""
    bank = F.normalize(bank, dim=1)
    queries = F.normalize(queries, dim=1)
    k = min(k, bank.shape[0])
    scores = torch.zeros(queries.shape[0], num_classes)
    for start in range(0, queries.shape[0], 1024):
        sim = queries[start : start + 1024] @ bank.T  # [q, N]
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = F.one_hot(bank_labels[top_idx], num_classes).float()  # [q, k, C]
        scores[start : start + 1024] = (votes * weights.unsqueeze(-1)).sum(1)
    return scores


def knn_accuracy(
    encoder: nn.Module,
    data: DataConfig,
    views: TwoViews,
    num_classes: int,
    device: torch.device | str = "cpu",
    k: int = 20,
    max_bank: int | None = 10000,
    seed: int = 0,
) -> float:
    """Top-1 kNN accuracy of `encoder` features: train split as bank (at most `max_bank`
    samples, drawn with `seed` over the whole split), val split as queries."""
    bank, bank_y = extract_features(encoder, data, data.split, views, device, max_bank, seed)
    queries, query_y = extract_features(encoder, data, data.val_split, views, device)
    pred = knn_predict(bank, bank_y, queries, num_classes, k).argmax(1)
    return (pred == query_y).float().mean().item()


def checkpoint_knn(checkpoint: str | Path, manifest: str | None = None) -> dict[str, float]:
    """kNN accuracy of a checkpoint's encoder and of the same encoder at initialisation.

    Reads the checkpoint's encoder artifact (:func:`ssl_dist.artifact.read_artifact`: no pickle).
    """
    found = read_artifact(checkpoint)
    cfg = found.cfg
    if manifest:
        cfg.data.manifest = manifest
    shards = open_shards(cfg.data)
    views = views_for(cfg, shards.manifest)
    num_classes = len(shards.manifest.classes)
    torch.manual_seed(cfg.run.seed)  # the same init the run started from
    at_init = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    init = knn_accuracy(at_init, cfg.data, views, num_classes)
    trained = knn_accuracy(found.build_encoder(), cfg.data, views, num_classes)
    return {"knn_init": init, "knn_trained": trained}
