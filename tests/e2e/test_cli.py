"""The `ssl-dist` command as a user runs it: exit codes, messages, nothing half-written."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def ssl_dist(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "ssl_dist.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-o", "optim.lrr=1"], "optim.lrr: unknown key"),
        (["-o", "method.name=no_such_method"], "method.name: must be one of"),
        (["-o", "data.batch_size=-3"], "data.batch_size"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_bad_config_exits_2_with_one_line(args, needle):
    r = ssl_dist("pretrain", *args, "--print-config")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_print_config_resolves_recipe_and_overrides():
    r = ssl_dist(
        "pretrain", "-c", "launch/recipes/digits-demo.yaml", "-o", "optim.lr=0.7", "--print-config"
    )
    assert r.returncode == 0, r.stderr
    assert "lr: 0.7" in r.stdout and "manifest: work/demo/data/manifest.json" in r.stdout


def test_prepare_verify_stream(tmp_path):
    out = tmp_path / "digits"
    r = ssl_dist(
        "data", "prepare", "--source", "digits", "--out", str(out), "--samples-per-shard", "300"
    )
    assert r.returncode == 0, r.stderr
    assert "train: 1438 samples in 5 shards" in r.stdout
    r = ssl_dist("data", "verify", str(out))
    assert r.returncode == 0 and "ok" in r.stdout
    r = ssl_dist(
        "data",
        "stream",
        "-o",
        f"data.manifest={out}/manifest.json",
        "-o",
        "data.batch_size=100",
        "--world-size",
        "2",
        "--rank",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "streamed 5 batches / 500 images" in r.stdout
    # Refuses to write into a non-empty dir, without touching it.
    before = sorted(p.name for p in out.iterdir())
    r = ssl_dist("data", "prepare", "--source", "digits", "--out", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    # A damaged shard: verify exits non-zero naming it.
    shard = out / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-2000])
    r = ssl_dist("data", "verify", str(out))
    assert r.returncode == 1 and "train-000002.tar" in r.stderr


def test_bad_source_input_exits_2(tmp_path):
    r = ssl_dist(
        "data",
        "prepare",
        "--source",
        "fashion-mnist",
        "--input",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    )
    assert r.returncode == 2 and "dataset-fashion-mnist" in r.stderr
    assert not (tmp_path / "o").exists()
    r = ssl_dist("data", "prepare", "--source", "cifar", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown source" in r.stderr


def test_imagefolder(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "in" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(tmp_path / "in" / c / f"{i}.jpg")
    out = tmp_path / "o"
    r = ssl_dist(
        "data",
        "prepare",
        "--source",
        "imagefolder",
        "--input",
        str(tmp_path / "in"),
        "--out",
        str(out),
        "--val-fraction",
        "0.25",
    )
    assert r.returncode == 0, r.stderr
    assert "train: 9 samples" in r.stdout and "val: 3 samples" in r.stdout
    assert ssl_dist("data", "verify", str(out)).returncode == 0


@pytest.mark.slow
def test_local_pretrain_log_has_no_cleaner_flood(make_shards, tmp_path):
    """A run on the local Ray instance `pretrain` starts (no dashboard, so no State API) trains
    and its log is not flooded by Ray Train's placement-group cleaner (a warning a second). Its
    shards have no val split: the kNN monitor is off, with a line saying so (it once hung)."""
    d, _ = make_shards(96, 32, size=16)
    args = [
        *("pretrain", "-c", "launch/recipes/tiny.yaml", "-o", f"data.manifest={d}/manifest.json"),
        *("-o", "run.max_steps=8", "-o", f"run.storage_path={tmp_path / 'runs'}"),
        *("-o", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"),
    ]
    # A file, not a pipe: Ray's own processes inherit the output and may outlive the command.
    with open(tmp_path / "log.txt", "w") as out:
        r = subprocess.run(
            [sys.executable, "-m", "ssl_dist.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=240,
        )
    log = (tmp_path / "log.txt").read_text()
    assert r.returncode == 0, log[-3000:]
    assert "Reporting training result" in log  # the workers' lines reach the log
    assert "Failed to query Ray Train Controller" not in log
    # Once: Ray Train's print patch (off in our workers) wrote each worker's line twice.
    assert log.count("kNN monitor off: the manifest has no 'val' samples") == 1, log[-3000:]
    assert log.count("precision: ") == 1, log[-3000:]
