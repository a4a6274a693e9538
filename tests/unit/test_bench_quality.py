"""`bench quality` / `bench scaling` pieces on a tiny fake Fashion-MNIST (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ssl_dist.bench import budget, features, fmnist, quality, report, scaling
from ssl_dist.config import Config, ConfigError
from tests.fake_fashion_mnist import TINY, fake_fashion_mnist


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> tuple[Path, Path]:
    """``(idx dir, manifest)`` shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("fm")
    idx = fake_fashion_mnist(tmp / "idx")
    manifest = fmnist.prepare_shards(tmp / "work", idx, samples_per_shard=20)
    return idx, manifest


def _cfg(manifest: Path, tmp: Path, *extra: str) -> Config:
    return quality.bench_config(quality.RECIPE, manifest, tmp, "simclr", "t", [*TINY, *extra])


@pytest.mark.unit
def test_missing_data_exits_2_with_the_install_hint(tmp_path):
    from ssl_dist.cli import app

    for cmd in ("quality", "scaling"):
        args = ["bench", cmd, "--input", str(tmp_path / "none"), "--work", str(tmp_path / "w")]
        if cmd == "quality":
            args += ["--out", str(tmp_path / "q.json")]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, r.output
        assert "apt-get install dataset-fashion-mnist" in r.output
        assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()  # nothing prepared, nothing installed


@pytest.mark.unit
def test_prepared_shards_are_cached(fake, tmp_path):
    idx, manifest = fake
    before = manifest.stat().st_mtime_ns
    again = fmnist.prepare_shards(manifest.parent.parent, idx, samples_per_shard=20)
    assert again == manifest and manifest.stat().st_mtime_ns == before
    doc = json.loads(manifest.read_text())
    assert doc["splits"]["train"]["samples"] == 60 and doc["splits"]["val"]["samples"] == 20


@pytest.mark.unit
def test_holdout_scores_on_the_end_of_train_and_never_writes_the_test_set(fake, tmp_path):
    from ssl_dist.data.sources import fashion_mnist
    from ssl_dist.data.stream import open_shards, stream

    idx, official = fake
    manifest = fmnist.prepare_shards(tmp_path, idx, samples_per_shard=20, holdout_n=15)
    assert manifest.parent.name == "data-holdout15" and manifest != official
    doc = json.loads(manifest.read_text())
    assert doc["source"] == "fashion-mnist-holdout15"
    assert doc["splits"]["train"]["samples"] == 45 and doc["splits"]["val"]["samples"] == 15
    cfg = _cfg(manifest, tmp_path)
    shards = open_shards(cfg.data, "val")
    val = torch.cat(
        [
            b.eval_images()
            for b in stream(cfg.data, 0, 1, 0, split="val", partial=True, shards=shards)
        ]
    )
    # The held-out images are train's last 15, in order; none of the official test images.
    train = fashion_mnist(idx).splits["train"]
    expected = torch.stack([torch.tensor(train.load(i)) for i in range(45, 60)])
    assert torch.equal(val.reshape(15, 28, 28), expected.to(val.dtype))
    with pytest.raises(ConfigError, match="holdout must lie between"):
        fmnist.prepare_shards(tmp_path / "bad", idx, holdout_n=60)


@pytest.mark.unit
def test_plan_budget_fits_steps_and_checkpoints_to_the_time():
    cal = budget.Calibration(step_s=0.5, startup_s=20.0, wall_s=26.0, steps=12)
    steps, every = budget.plan_budget(120.0, cal)
    assert steps == int((120 - 20 - 3 * budget.CHECKPOINT_S) / 0.5)
    assert every * (budget.CHECKPOINTS - 1) < steps <= every * budget.CHECKPOINTS
    assert budget.plan_budget(1.0, cal) == (budget.CHECKPOINTS, 1)  # never below one per point


@pytest.mark.unit
def test_evaluator_scores_encoders_and_pixels(fake, tmp_path):
    _, manifest = fake
    cfg = _cfg(manifest, tmp_path)
    ev = features.Evaluator(cfg)
    assert ev.train.images.shape == (60, 1, 28, 28) and ev.val.labels.shape == (20,)
    init = ev.encoder(features.init_encoder(cfg))
    assert 0 <= init["probe_top1"] <= 1 and 0 <= init["knn_top1"] <= 1
    assert init["feature_dim"] == 8
    pix = ev.pixels(32)
    assert pix["feature_dim"] == 32 * 32 and pix["probe_top1"] > 0.5  # the bands are separable
    # The random-init encoder is the training init: same seed, same weights.
    a, b = features.init_encoder(cfg).state_dict(), features.init_encoder(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.unit
def test_supervised_reference_stops_on_time(fake, tmp_path):
    _, manifest = fake
    cfg = _cfg(manifest, tmp_path)
    ev = features.Evaluator(cfg)
    sup = features.train_supervised(cfg, ev.train, ev.val, ev.views, 1.0, threads=1, batch_size=16)
    assert sup.steps >= 1 and sup.seconds < 10 and 0 <= sup.head_top1 <= 1


@pytest.mark.dist  # phase_shares spawns a 2-process gloo group
def test_scaling_pieces(fake, tmp_path):
    _, manifest = fake
    assert report.matmul_gflops(1, seconds=0.05, n=128) > 0
    cfg = _cfg(manifest, tmp_path)
    flops = scaling.model_flops(cfg, batch=4)
    assert flops["train_flops_per_image"] > 4 * flops["encoder_forward_flops_per_view"] > 0
    assert cfg.method.rotation_weight > 0  # the recipe's: its quarter-turns are counted too
    plain = scaling.model_flops(_cfg(manifest, tmp_path, "method.rotation_weight=0"), batch=4)
    assert 0 < plain["train_flops_per_image"] < flops["train_flops_per_image"]
    small = scaling._cfg(cfg, 1, 16, scaling.WARMUP + 2, tmp_path, "bare")
    bare = scaling.bare_rate(small, threads=1)
    assert bare["images_s"] > 0
    rows = scaling.phase_shares(scaling._cfg(cfg, 2, 16, 2, tmp_path, "ph"), steps=2)
    by_phase = {(r["rank"], r["phase"]): r for r in rows}
    assert set(scaling.PHASES) <= {p for _, p in by_phase}
    assert by_phase[(0, "gather_fwd")]["ms"] > 0 and by_phase[(1, "gather_bwd")]["ms"] > 0
    shares = sum(r["share"] for r in rows if r["rank"] == 0 and r["phase"] in scaling.PHASES)
    assert shares == pytest.approx(1.0)
