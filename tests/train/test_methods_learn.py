"""Each method learns: a short single-process run on digits shards lowers the loss and lifts the
kNN accuracy of the encoder above the same encoder at initialisation (MAE: the loss only,
see KNN_UNCHECKED)."""

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


# Single-view methods, with what they change. SimMIM masks 2 px squares of the 16 px digits
# (4 px squares: kNN +0.06 in 60 steps here, 2 px: +0.09). MAE trains vit_tiny (12 blocks, the
# smallest ViT offered) with AdamW for 30 steps: 27 s here, 60 steps 44 s.
OVERRIDES = {
    "simmim": ["method.masked.mask_patch=2"],
    "mae": [
        "model.encoder=vit_tiny",
        "model.vit_heads=3",
        "optim.name=adamw",
        "optim.lr=2e-3",
        "optim.weight_decay=0.05",
        "optim.betas=[0.9, 0.95]",
        "run.max_steps=30",
    ],
    # DINO: a head of K = 256 (65536 in the recipe) and AdamW as in its reference: kNN 0.604 ->
    # 0.669 in 60 steps (LARS at the demo's lr 1.0: 0.604 -> 0.655, at the margin); teacher
    # temperature 0.04, no warm-up, no local crops (2 local crops of 8 px: +0.059).
    "dino": [
        "method.dino.out_dim=256",
        "method.dino.hidden_dim=256",
        "method.dino.bottleneck_dim=64",
        "optim.name=adamw",
        "optim.lr=2e-3",
        "optim.weight_decay=0.04",
    ],
}
KNN_UNCHECKED = {
    # MAE's class token learns only through the decoder's attention to it: on 16 px digits its
    # kNN accuracy stays near init (0.543 -> 0.554 in 30 steps, 0.529 in 60) while the masked
    # reconstruction loss falls (1.21 -> 0.73). The harness has no linear probe, so MAE is held
    # to its loss only; its features are checked for shape, not quality (tests/unit/test_mae.py).
    "mae",
}


@pytest.mark.parametrize(
    "method", ["simclr", "moco_v2", "moco_v3", "byol", "rotation", "simmim", "mae", "dino"]
)
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
            *OVERRIDES.get(method, []),
        ],
    )
    r = run_local(cfg)
    n = len(r.losses) // 4
    first, last = sum(r.losses[:n]) / n, sum(r.losses[-n:]) / n
    assert r.steps == cfg.run.max_steps
    if method not in ("moco_v2", "dino"):
        # MoCo v2's loss is not monotone this early: its negatives are a queue of keys from an
        # encoder that improves with the query one, so the task gets harder as it learns (the
        # note records its loss over a few hundred steps). Nor is DINO's: its target sharpens as
        # the centre and the teacher move (about 4.8 -> 5.6 in these 60 steps). The kNN check
        # below holds for both.
        assert last < first - 0.1, f"{method}: loss {first:.3f} -> {last:.3f}"
    if method in KNN_UNCHECKED:
        return
    assert r.knn_final > r.knn_init + 0.05, f"{method}: kNN {r.knn_init:.3f} -> {r.knn_final:.3f}"
