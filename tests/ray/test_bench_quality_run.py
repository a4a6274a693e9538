"""`bench quality` end to end on a tiny fake Fashion-MNIST: calibration and a time-boxed
pretraining run on real Ray workers, checkpoints probed, baselines, the supervised reference,
table / JSON / PNG, and the MLflow run (sqlite)."""

from __future__ import annotations

import json

import pytest

from ssl_dist.bench import fmnist, quality
from ssl_dist.bench.journal import JOURNAL
from tests.fake_fashion_mnist import TINY, fake_fashion_mnist

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_whole_bench_on_ray(tmp_path):
    idx = fake_fashion_mnist(tmp_path / "idx", n_train=200, n_test=40)
    # Small shards, so that each of the 2 workers gets some (the bench reuses a prepared set).
    fmnist.prepare_shards(tmp_path / "work", idx, samples_per_shard=20)
    out = tmp_path / "res" / "quality.json"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = {
        "out": out,
        "work": tmp_path / "work",
        "budget_min": 0.25,
        "input_dir": idx,
        "overrides": TINY,
        "tracking_uri": uri,
        "supervised_threads": 1,
        "seeds": 2,
    }
    doc = quality.run(**args)
    saved = json.loads(out.read_text())
    encoders = [r["encoder"] for r in saved["rows"]]
    assert encoders[:3] == ["raw pixels 32px", "raw pixels 28px", "random init"]
    assert any(e.startswith("simclr @") for e in encoders)
    assert any(e.startswith("supervised @") for e in encoders)
    steps = [p["step"] for p in saved["curves"]["simclr"]]
    run = saved["pretrain_runs"][0]
    # Random init, then the checkpoints of the time-boxed run up to its planned last step.
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 3
    assert steps[-1] == run["max_steps"] and run["stopped_by_time_limit"] is False
    assert run["mlflow"]["run_id"] and "version" in run["mlflow"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert doc["mlflow_run_id"] and saved["mlflow_run_id"] == doc["mlflow_run_id"]
    assert {
        "prepare_s",
        "warmup_s",
        "simclr_calibrate_s",
        "simclr_pretrain_s",
        "simclr_probes_s",
        "supervised_train_s",
    } <= set(saved["phases_s"])
    assert all(0.0 <= r["probe_top1"] <= 1.0 for r in saved["rows"])
    # The best (only) method again with the next seed: its own run, row and the spread.
    seeded = [r for r in saved["rows"] if r["method"] == "simclr"]
    assert [r["seed"] for r in seeded] == [0, 1]
    assert [p["seed"] for p in saved["pretrain_runs"]] == [0, 1]
    assert saved["pretrain_runs"][1]["run"] != run["run"]
    spread = saved["seed_spread"]
    assert spread["method"] == "simclr" and spread["seeds"] == [0, 1]
    probes = [r["probe_top1"] for r in seeded]
    assert spread["probe_top1_spread"] == pytest.approx(max(probes) - min(probes))
    assert "simclr_seed1_pretrain_s" in saved["phases_s"]
    # One throw-away warm-up run before the first calibration, none before the second seed's.
    assert len(list((tmp_path / "work" / "runs").glob("*-warmup"))) == 1
    peaks = saved["matmul_peak_gflop_s"]
    assert peaks["fp32_1_thread"] > 0 and len(peaks) == 3

    # Resumed as if cut short after the second seed's run: its probe is done again; nothing is
    # pretrained (no new run directory) or trained supervised again.
    journal = tmp_path / "work" / JOURNAL
    j = json.loads(journal.read_text())
    assert set(j["runs"]) == set(j["curves"]) == {"simclr", "simclr_seed1"}
    del j["curves"]["simclr_seed1"]
    journal.write_text(json.dumps(j))
    run_dirs = sorted((tmp_path / "work" / "runs").iterdir())
    again = quality.run(**args, resume=True)
    assert sorted((tmp_path / "work" / "runs").iterdir()) == run_dirs
    assert len(again["parts"]) == 2 and again["parts"][1]["runs"] == []
    assert again["pretrain_runs"] == saved["pretrain_runs"]
    assert again["curves"] == saved["curves"]  # journaled
    for k in ("probe_top1", "knn_top1"):  # the second seed's probe again, on the same checkpoint
        assert again["seed_spread"][k] == pytest.approx(spread[k], abs=0.03)
    assert "simclr_seed1_probes_s" in again["phases_s"]
    assert not {"warmup_s", "simclr_pretrain_s", "simclr_probes_s", "supervised_train_s"} & set(
        again["phases_s"]
    )
    sup = [r for r in again["rows"] if r["method"] == "cross-entropy"]
    assert sup == [r for r in saved["rows"] if r["method"] == "cross-entropy"]
