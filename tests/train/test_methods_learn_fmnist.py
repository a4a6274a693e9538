"""Each method learns on real images: a short single-process run on a Fashion-MNIST subset (the
first 3,000 images of train and of the official test split) lifts the linear probe and the kNN
accuracy of the frozen encoder above the same encoder at initialisation. Each method runs with
the recipe `ssl-dist bench quality` gives it (its METHOD_OVERRIDES), on a narrower encoder
(MAE: a vit_tiny of 2 blocks).

Needs Debian's dataset-fashion-mnist (`make test` installs it); skipped, saying so, without it.
"""

from __future__ import annotations

import pytest

from ssl_dist.bench.features import encode, evaluate_features, load_split
from ssl_dist.bench.fmnist import missing_idx
from ssl_dist.bench.quality import METHOD_OVERRIDES, RECIPE
from ssl_dist.config import load_config
from ssl_dist.data.shards import write_shards
from ssl_dist.data.sources import FASHION_MNIST_DIR, fashion_mnist, head
from ssl_dist.data.stream import open_shards
from ssl_dist.data.views import views_for
from ssl_dist.train.local import run_local

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(missing_idx(FASHION_MNIST_DIR)),
        reason=f"no Fashion-MNIST in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
    ),
]

IMAGES = 3000
STEPS = {"dino": 240, "mae": 240}
"""Steps per method (default 80). DINO's probe does not move in 80 steps (0.590 -> 0.584; kNN
0.488 -> 0.533), whatever the teacher momentum (0.9, 0.96), temperature (0.07), learning rate
(5e-3), optimizer (LARS) or local crops (none) tried; in 240 steps: 0.590 -> 0.627, kNN 0.555."""
NARROWER = {"mae": ("model.vit_depth=2",)}
"""The test's encoder where the recipe's narrower ResNet does not apply. MAE with vit_tiny's 12
blocks (80 steps) left the probe at 0.738 -> 0.721 and kNN at 0.483 -> 0.466 on 2,000 test
images; 4 blocks, 200 steps: +3.4 / +4.6 points; 2 blocks, 240 steps: +5.2 / +9.1. Before the
encoder's position embedding was the reference's fixed sin-cos one (timm's learned one starts as
noise), no variant tried lifted kNN (12 blocks, 80 steps: probe +4.8, kNN -1.6)."""
GAIN = 0.025  # 2.5 points
"""Top-1 on the 3,000 test images each method must gain over its encoder at init, for the
linear probe and for kNN (a binomial standard error there is about 0.9 points). Measured
here (probe / kNN gain): SimCLR +11.7 / +19.4, MoCo v2 +6.5 / +15.8, MoCo v3 +7.1 / +11.6, BYOL
+6.9 / +10.2, rotation +7.7 / +11.7, SimMIM +5.0 / +4.4, DINO +3.7 / +6.7; MAE (2,000 test
images) +5.2 / +9.1."""
NON_MONOTONE_LOSS = {"moco_v2", "dino"}
"""MoCo v2's negatives are a queue of keys from an encoder that improves with the query one, so
its task gets harder as it learns; DINO's target sharpens as the centre and the teacher move."""


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmnist")
    write_shards(head(fashion_mnist(), IMAGES), out, samples_per_shard=500)
    return out


def _scores(cfg):
    """A probe + kNN scorer on the frozen encoder's plain-view features, at cfg's size."""
    views = views_for(cfg, open_shards(cfg.data).manifest)
    train = load_split(cfg.data, cfg.data.split)
    val = load_split(cfg.data, cfg.data.val_split)

    def score(encoder):
        tx, vx = encode(encoder, train.images, views), encode(encoder, val.images, views)
        r = evaluate_features(tx, train.labels, vx, val.labels, 10, max_iter=200)
        return {"probe": r["probe_top1"], "knn": r["knn_top1"]}

    return score


@pytest.mark.parametrize(
    "method", ["simclr", "moco_v2", "moco_v3", "byol", "rotation", "simmim", "dino", "mae"]
)
def test_method_lifts_probe_and_knn_on_fashion_mnist(fmnist_shards, method):
    cfg = load_config(
        RECIPE,
        [
            f"data.manifest={fmnist_shards}/manifest.json",
            "data.batch_size=64",
            "data.shuffle_buffer=500",
            "model.widths=[8, 16, 32, 64]",
            "model.proj_hidden=128",
            f"method.name={method}",
            "method.queue_size=1024",
            "scaling.num_workers=1",
            "run.epochs=100",
            f"run.max_steps={STEPS.get(method, 80)}",
            *METHOD_OVERRIDES.get(method, ()),
            *NARROWER.get(method, ()),
        ],
    )
    r = run_local(cfg, knn=False, evaluate=_scores(cfg))
    assert r.steps == cfg.run.max_steps
    before, after = r.scores_init, r.scores_final
    assert after["probe"] > before["probe"] + GAIN, f"{method}: {before} -> {after}"
    assert after["knn"] > before["knn"] + GAIN, f"{method}: {before} -> {after}"
    if method not in NON_MONOTONE_LOSS:
        n = len(r.losses) // 4
        first, last = sum(r.losses[:n]) / n, sum(r.losses[-n:]) / n
        assert last < first - 0.1, f"{method}: loss {first:.3f} -> {last:.3f}"
