"""Each method learns: a short single-process run on digits shards lowers the loss and lifts the
kNN accuracy of the encoder above the same encoder at initialisation."""

import pytest

from ssl_dist.config import load_config
from ssl_dist.data.shards import write_shards
from ssl_dist.data.sources import digits
from ssl_dist.train.local import run_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_shards(digits(), out, samples_per_shard=200)
    return out


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "moco_v3", "byol"])
def test_method_learns(digits_shards, method):
    cfg = load_config(
        "launch/recipes/digits-demo.yaml",
        [
            f"data.manifest={digits_shards}/manifest.json",
            "data.image_size=16",
            "data.batch_size=64",
            "model.widths=[8, 16, 32, 64]",
            "model.depths=[1, 1, 1, 1]",
            f"method.name={method}",
            "method.queue_size=1024",
            "run.epochs=100",
            "run.max_steps=60",
        ],
    )
    r = run_local(cfg)
    n = len(r.losses) // 4
    first, last = sum(r.losses[:n]) / n, sum(r.losses[-n:]) / n
    assert r.steps == 60
    if method != "moco_v2":
        # MoCo v2's loss is not monotone this early: its negatives are a queue of keys from an
        # encoder that improves with the query one, so the task gets harder as it learns (the
        # note records its loss over a few hundred steps). The kNN check below holds for all.
        assert last < first - 0.1, f"{method}: loss {first:.3f} -> {last:.3f}"
    assert r.knn_final > r.knn_init + 0.05, f"{method}: kNN {r.knn_init:.3f} -> {r.knn_final:.3f}"
