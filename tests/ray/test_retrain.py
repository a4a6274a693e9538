"""`ssl-dist retrain` end to end on a local Ray instance and a sqlite MLflow registry: the first
challenger becomes champion, a better one takes over, a deliberately under-trained one is refused,
and a second job cannot start while one holds the lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_dist import tracking
from ssl_dist.config import load_config
from ssl_dist.retrain import retrain

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def retrain_cfg(digits_shards, tmp_path):
    def make(*overrides: str):
        return load_config(
            "launch/recipes/digits-demo.yaml",
            [
                f"data.manifest={digits_shards}/manifest.json",
                "data.image_size=16",
                "model.widths=[8,16,32,64]",
                "model.depths=[1,1,1,1]",
                "tracking.knn_every_epochs=0",
                f"run.storage_path={tmp_path}/runs",
                "run.checkpoint_every=1000",
                f"retrain.eval_data={digits_shards}",
                "retrain.margin=0.02",
                "tracking.model_name=digits",
                *overrides,
            ],
        )

    return make


@pytest.mark.timeout(900)
def test_champion_challenger(local_ray, retrain_cfg, capsys):
    # 1. No champion yet: a barely trained first challenger is promoted (nothing to beat).
    first = retrain(retrain_cfg("run.max_steps=1", "retrain.warm_start=false"))
    assert first.decision == "promoted" and first.champion_version is None
    # 2. Trained properly (from scratch): it beats that champion by more than the margin.
    second = retrain(retrain_cfg("run.max_steps=60", "retrain.warm_start=false"))
    assert second.decision == "promoted", second
    assert second.champion_version == first.challenger_version
    assert second.challenger_top1 >= second.champion_top1 + 0.02
    # The schedule fires again before new data lands: the champion was made from this data and
    # config, so nothing is trained.
    idle = retrain(retrain_cfg("run.max_steps=60", "retrain.warm_start=false"))
    assert idle.decision == "skipped" and "nothing new" in idle.reason, idle
    assert idle.challenger_version is None and idle.champion_version == second.challenger_version
    # 3. Deliberately under-trained (1 step from scratch): refused, the champion stays.
    third = retrain(retrain_cfg("run.max_steps=1", "retrain.warm_start=false", "run.seed=1"))
    assert third.decision == "kept", third
    assert third.champion_version == second.challenger_version
    assert third.challenger_top1 < third.champion_top1 + 0.02

    cfg = retrain_cfg()
    c = tracking.client(tracking.resolve_uri(None, cfg.run.storage_path))
    assert c.get_model_version_by_alias("digits", "champion").version == second.challenger_version
    refused = c.get_model_version("digits", third.challenger_version).tags
    assert refused["ssl_dist.retrain_decision"] == "kept"
    assert float(refused["ssl_dist.retrain_challenger_top1"]) == pytest.approx(
        third.challenger_top1, abs=1e-6
    )
    assert float(refused["ssl_dist.retrain_champion_top1"]) == pytest.approx(
        third.champion_top1, abs=1e-6
    )
    champ = c.get_model_version("digits", second.challenger_version).tags
    assert champ["ssl_dist.retrain_decision"] == "promoted"
    assert champ[f"ssl_dist.challenged_by_v{third.challenger_version}"].startswith("kept")

    # 4. The same job again (same data, config, champion): already decided, nothing trained.
    again = retrain(retrain_cfg("run.max_steps=1", "retrain.warm_start=false", "run.seed=1"))
    assert again.decision == "skipped" and again.challenger_version == third.challenger_version


def test_second_job_refused_while_the_lock_is_held(retrain_cfg, tmp_path):
    cfg = retrain_cfg()
    lock = Path(cfg.run.storage_path) / "locks" / "retrain-digits.lock"
    lock.parent.mkdir(parents=True)
    # Held by a live process of this host (this test).
    lock.write_text(
        json.dumps(
            {
                "host": os.uname().nodename,
                "pid": os.getpid(),
                "started": time.time(),
                "owner": "another job",
            }
        )
    )
    ssl_dist = Path(sys.executable).with_name("ssl-dist")
    t = time.perf_counter()
    r = subprocess.run(
        [
            str(ssl_dist),
            "retrain",
            "-c",
            "launch/recipes/digits-demo.yaml",
            "-o",
            f"data.manifest={cfg.data.manifest}",
            "-o",
            f"run.storage_path={cfg.run.storage_path}",
            "-o",
            "tracking.model_name=digits",
            "--eval-data",
            str(cfg.retrain.eval_data),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 3, r.stderr
    assert "another retrain holds" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.perf_counter() - t < 60
    assert not list(Path(cfg.run.storage_path).glob("retrain-*")), "it started training"
    assert json.loads(lock.read_text())["owner"] == "another job"  # left alone
