"""A trained encoder seen through the val split: what the driver hands to tracking at the end of a
run (the embedding figure, and the registered model's input example and signature)."""

from __future__ import annotations

from pathlib import Path

import torch

from ssl_dist.artifact import read_artifact
from ssl_dist.config import Config
from ssl_dist.data.stream import open_shards, stream
from ssl_dist.data.views import views_for
from ssl_dist.evaluate.knn import extract_features
from ssl_dist.tracking import EncoderSample


def encoder_sample(cfg: Config, artifact_dir: Path, max_samples: int = 2000) -> EncoderSample:
    """Features of up to `max_samples` val samples (``cfg.data.val_split``) under the encoder
    artifact in `artifact_dir`, and an input example of two plain views with their features."""
    encoder = read_artifact(artifact_dir).build_encoder().eval()
    shards = open_shards(cfg.data)
    views = views_for(cfg, shards.manifest)
    split = cfg.data.val_split
    features, labels = extract_features(encoder, cfg.data, split, views, max_samples=max_samples)
    first = next(iter(stream(cfg.data, 0, 1, 0, split=split, partial=True)))
    example = views.plain(first.eval_images()[:2])
    with torch.no_grad():
        out = encoder(example)
    classes = list(shards.manifest.classes)
    return EncoderSample(features, labels, classes, example.numpy(), out.numpy())
