"""The kNN monitor's bank: a seeded random sample of the whole split, drawn over all shards."""

import numpy as np
import pytest
import torch
from torch import nn

from ssl_dist.config import DataConfig, ViewsConfig
from ssl_dist.data.shards import write_shards
from ssl_dist.data.sources import Source, Split
from ssl_dist.data.views import TwoViews
from ssl_dist.evaluate.knn import extract_features

pytestmark = pytest.mark.unit

CLASSES, PER_CLASS, PER_SHARD = 20, 100, 100


def _class_sorted(tmp_path):
    """2,000 8 px grey images written class by class (each shard holds one class, as an
    unshuffled ImageNet folder would); pixels 0 and 1 spell the sample's index in the split."""
    n = CLASSES * PER_CLASS
    images = np.zeros((n, 8, 8), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    labels = [i // PER_CLASS for i in range(n)]
    split = Split([f"s{i:05d}" for i in range(n)], labels, lambda i: images[i])
    source = Source("sorted", [str(c) for c in range(CLASSES)], 1, {"train": split})
    out = tmp_path / "sorted"
    write_shards(source, out, PER_SHARD)
    return DataConfig(manifest=str(out / "manifest.json"), batch_size=64, image_size=8)


def _bank(data, n, seed=0):
    views = TwoViews(ViewsConfig(normalize=False), 8, 1)
    feats, labels = extract_features(nn.Flatten(), data, "train", views, max_samples=n, seed=seed)
    index = (feats[:, 0] * 255).round().long() * 256 + (feats[:, 1] * 255).round().long()
    return index, labels


def test_bank_is_a_seeded_sample_of_every_class(tmp_path):
    data = _class_sorted(tmp_path)
    index, labels = _bank(data, 200)
    assert len(index) == 200 and len(set(index.tolist())) == 200, "not 200 distinct samples"
    assert torch.equal(labels, index // PER_CLASS), "a label does not belong to its image"
    counts = torch.bincount(labels, minlength=CLASSES)
    assert (counts > 0).all(), f"classes missing from the bank: {counts.tolist()}"
    assert counts.max() <= 3 * 200 // CLASSES, f"one class dominates: {counts.tolist()}"
    again, _ = _bank(data, 200)
    assert torch.equal(again.sort().values, index.sort().values), "same seed, another bank"
    other, _ = _bank(data, 200, seed=1)
    assert not torch.equal(other.sort().values, index.sort().values), "the seed is ignored"


def test_bank_as_large_as_the_split_reads_everything(tmp_path):
    data = _class_sorted(tmp_path)
    index, _ = _bank(data, CLASSES * PER_CLASS)
    assert sorted(index.tolist()) == list(range(CLASSES * PER_CLASS))
