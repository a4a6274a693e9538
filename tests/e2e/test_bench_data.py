"""`bench prepare` and `bench loader --source folder` end to end on a small generated folder:
every row measured with a positive rate, the machine's CPU capability in the JSON, bad
arguments answered with exit 2 and one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IMAGES = 200


def ssl_dist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_dist.cli", *args],
        capture_output=True,
        text=True,
        timeout=280,
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    """``(work dir, JSON)`` of one `bench prepare` run on 200 files."""
    tmp = tmp_path_factory.mktemp("bench-prepare")
    out = tmp / "prepare.json"
    args = ["--images", str(IMAGES), "--png-images", "40", "--repeats", "2"]
    args += ["--work", str(tmp / "w")]
    r = ssl_dist("bench", "prepare", *args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "| writer" in r.stdout and "CPU capability" in r.stdout
    return tmp / "w", json.loads(out.read_text())


def test_prepare_measures_every_writer_against_the_limit(prepared):
    _, doc = prepared
    assert doc["bench"] == "prepare"
    assert doc["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    rows = {(r["writer"].split(" (")[0].split(":")[0], r["workers"]): r for r in doc["rows"]}
    cores = doc["cores"]
    expected = {
        ("raw tar", 1),
        ("data prepare", 1),
        ("data prepare", cores),
        ("decode + PNG re-encode", 1),
    }
    assert set(rows) == expected
    for r in doc["rows"]:
        assert r["images_s"] > 0 and r["seconds"] > 0 and r["out_MB"] > 0, r
        # The fastest of the two runs is reported, with the spread.
        assert len(r["runs_s"]) == 2 and r["seconds"] == min(r["runs_s"]), r
        assert r["spread"] == pytest.approx(max(r["runs_s"]) / min(r["runs_s"])), r
    assert rows["raw tar", 1]["vs_limit"] == 1.0
    # Every input file goes through the writers; the PNG writer is timed on its subset.
    assert rows["data prepare", 1]["images"] == doc["files"] == IMAGES
    assert rows["decode + PNG re-encode", 1]["images"] == 40
    # Original bytes: the shards are about the input's size; PNG re-encoding is larger.
    shards = rows["data prepare", cores]["out_vs_input"]
    assert 1.0 < shards < 1.5
    assert rows["decode + PNG re-encode", 1]["out_vs_input"] > 1.5 * shards
    assert doc["input_bytes"] > 0 and doc["input_disk_bytes"] >= doc["input_bytes"] * 0.9
    assert doc["same_shards_across_workers"] is True
    assert doc["skipped"] == 6  # the generator's 3 corrupt files per split


def test_loader_on_the_folder_shards_against_imagefolder(prepared, tmp_path):
    work, _ = prepared
    marker = next(work.glob("folder-*")) / ".complete"
    before = marker.stat().st_mtime_ns
    out = tmp_path / "loader.json"
    r = ssl_dist(
        "bench", "loader", "--source", "folder", "--images", str(IMAGES),
        "--folder-work", str(work), "--work", str(tmp_path / "w"), "--out", str(out),
        "--image-size", "64", "--batch-size", "8", "--seconds", "0.5",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert marker.stat().st_mtime_ns == before  # bench prepare's folder and shards reused
    assert Path(doc["shards"]).parent == work
    assert doc["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert doc["image_size"] == 64 and doc["crop_scale"] == [0.2, 1.0]
    readers = {(r["reader"], r["workers"]): r for r in doc["rows"]}
    stream = "ssl-dist stream (shards, 2 loader crops)"
    base = "map-style ImageFolder + 2x RandomResizedCrop"
    for w in (1, 2):
        for name in (stream, base):
            row = readers[name, w]
            assert row["images_s"] > 0 and row["per_worker"] == pytest.approx(row["images_s"] / w)
        assert readers[stream, w]["vs_map_style"] == pytest.approx(
            readers[stream, w]["images_s"] / readers[base, w]["images_s"]
        )
    assert readers["raw tar read (no decode)", 0]["images_s"] > 0
    # One Fashion-MNIST recipe worker's intake, measured in the same run; each loader row says
    # how many such workers one loader core feeds.
    fed = doc["consumer"]
    assert fed["recipe"] == "launch/recipes/fashion-mnist-cpu.yaml" and fed["batch_size"] == 128
    assert fed["images_s"] > 0 and "takes" in r.stdout
    for w in (1, 2):
        row = readers[stream, w]
        assert row["vs_consumer"] == pytest.approx(row["per_worker"] / fed["images_s"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["prepare", "--images", "5"], "--images must be at least 50"),
        (["prepare", "--png-images", "0"], "--png-images and --repeats must be at least 1"),
        (["prepare", "--repeats", "0"], "--png-images and --repeats must be at least 1"),
        (["loader", "--source", "imagenet"], "unknown --source 'imagenet'"),
        (["loader", "--images", "300"], "--images applies to --source folder only"),
        (["loader", "--consumer", "nope.yaml"], "--consumer 'nope.yaml': no such recipe file"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, needle, tmp_path):
    work = tmp_path / "w"
    r = ssl_dist("bench", *args, "--work", str(work), "--out", str(tmp_path / "o.json"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not work.exists() and not (tmp_path / "o.json").exists()
