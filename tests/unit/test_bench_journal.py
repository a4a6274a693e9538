"""`bench quality`'s journal: finished pieces survive a new process (a run is probed as soon as
it ends), `--resume` refuses other settings or a missing journal (exit 2 through the CLI, before
any work), and runs again what was never probed and lost its checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_dist.bench import quality
from ssl_dist.bench.budget import Calibration, Point, Pretrained, pretrain_all
from ssl_dist.bench.journal import JOURNAL, Journal
from ssl_dist.config import ConfigError
from tests.fake_fashion_mnist import TINY, fake_fashion_mnist

SETTINGS = {"methods": ["simclr"], "budget_min": 15.0, "seeds": 2}


def _run(tmp: Path, name: str = "quality-simclr-1") -> Pretrained:
    cfg = quality.bench_config(quality.RECIPE, tmp / "manifest.json", tmp, "simclr", name, TINY)
    ckpt = tmp / "runs" / name / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    points = [Point(0, 0.0, None), Point(40, 61.5, ckpt)]
    metrics = {"step_ms": 812.5, "mlflow": {"run_id": "abc", "version": "3"}}
    return Pretrained("simclr", cfg, points, 70.25, metrics, 40, 1.5, None)


def _started(work: Path, resume: bool, settings: dict | None = None) -> Journal:
    j = Journal.open(work, settings or SETTINGS, resume)
    j.begin_part({"fp32_1_thread": 50.0}, (0.5, 0.4, 0.3))
    return j


@pytest.mark.unit
def test_finished_runs_curves_and_the_supervised_row_survive_a_new_process(tmp_path):
    run = _run(tmp_path)
    j = _started(tmp_path, resume=False)
    assert not (tmp_path / JOURNAL).exists()  # written at the first finished piece
    calls = []

    def probe(key: str = "simclr", p: Pretrained = run) -> list[dict]:
        calls.append((key, p.max_steps))
        return [{"step": 0, "probe_top1": 0.6}, {"step": 40, "probe_top1": 0.8}]

    phases: dict[str, float] = {}
    # pretrain_all's on_done: the run, then at once its curve.
    j.resumer(probe, phases)["on_done"]("simclr", run, Calibration(0.8, 30.0, 40.0, 12))
    assert calls == [("simclr", 40)] and "simclr_probes_s" in phases
    assert j.curve("simclr", phases, probe)[-1]["probe_top1"] == 0.8
    assert calls == [("simclr", 40)]
    j.add_supervised({"encoder": "supervised @ 15 min", "probe_top1": 0.9}, {"threads": 2})

    run.points[-1].path.rmdir()  # type: ignore[union-attr]  # probed: its checkpoint not needed
    again = _started(tmp_path, resume=True)
    assert again.dropped == [] and again.resumed and len(again.data["parts"]) == 2
    assert again.data["parts"][0]["runs"] == ["simclr", "supervised"]
    loaded = again.resumer(probe, {})["done"]["simclr"]
    assert loaded.cfg == run.cfg and loaded.points == run.points
    assert (loaded.metrics, loaded.wall_s, loaded.max_steps) == (run.metrics, 70.25, 40)
    assert again.data["calibrations"]["simclr"]["step_s"] == 0.8
    phases = {}
    assert again.curve("simclr", phases, probe)[-1]["probe_top1"] == 0.8
    assert calls == [("simclr", 40)] and phases == {}  # journaled: not probed again
    assert again.supervised == {
        "row": {"encoder": "supervised @ 15 min", "probe_top1": 0.9},
        "info": {"threads": 2},
    }


@pytest.mark.unit
def test_pretrain_all_returns_finished_runs_without_running_anything(tmp_path):
    run = _run(tmp_path)
    phases: dict[str, float] = {}
    said: list[str] = []
    got = pretrain_all({"simclr": run.cfg}, 60.0, 2, {}, phases, said.append, {"simclr": run})
    assert got == [run] and phases == {}  # no warm-up, calibration or run
    assert said == ["simclr: pretrained by an earlier part of this bench (resumed)"]


@pytest.mark.unit
def test_resume_refuses_other_settings_and_no_journal_and_reruns_a_lost_unprobed_run(tmp_path):
    with pytest.raises(ConfigError, match="no bench to resume"):
        Journal.open(tmp_path, SETTINGS, resume=True)
    j = _started(tmp_path, resume=False)
    run = _run(tmp_path)
    j.add_run("simclr", run, Calibration(0.8, 30.0, 40.0, 12))  # cut short before its probe
    with pytest.raises(ConfigError, match=r"other settings \(budget_min, seeds\)"):
        Journal.open(tmp_path, {**SETTINGS, "budget_min": 5.0, "seeds": 1}, resume=True)
    kept = Journal.open(tmp_path, SETTINGS, resume=True)  # its checkpoint is there: probed later
    assert kept.dropped == [] and list(kept.runs()) == ["simclr"]
    run.points[-1].path.rmdir()  # type: ignore[union-attr]
    lost = Journal.open(tmp_path, SETTINGS, resume=True)
    assert lost.dropped == ["simclr"] and lost.runs() == {} and lost.data["calibrations"] == {}
    # Without --resume a bench starts a new journal (the old one is replaced at its first piece).
    fresh = _started(tmp_path, resume=False)
    assert fresh.resumer(lambda k, p: [], {})["done"] == {} and not fresh.resumed
    assert json.loads((tmp_path / JOURNAL).read_text())["runs"]  # untouched until then


@pytest.mark.e2e
def test_cli_resume_without_a_journal_exits_2_before_any_work(tmp_path):
    idx = fake_fashion_mnist(tmp_path / "idx")
    work, out = tmp_path / "w", tmp_path / "q.json"
    args = ["bench", "quality", "--resume", "--input", str(idx), "--work", str(work)]
    r = subprocess.run(
        [sys.executable, "-m", "ssl_dist.cli", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no bench to resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not work.exists() and not out.exists()
