"""The retrain lock and the newest-manifest pick, without training anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ssl_dist.config import load_config
from ssl_dist.retrain import LockHeld, RetrainLock, newest_manifest, run_key

pytestmark = pytest.mark.unit


def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "locks" / "retrain-m.lock"
    first = RetrainLock(path, ttl_s=3600, owner="first")
    assert first.acquire() is None
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["owner"] == "first"
    with pytest.raises(LockHeld, match="another retrain holds"):
        RetrainLock(path, ttl_s=3600, owner="second").acquire()
    first.release()
    assert not path.exists()
    with RetrainLock(path, ttl_s=3600, owner="third"):
        assert json.loads(path.read_text())["owner"] == "third"
    assert not path.exists()


def test_stale_locks_are_taken_over(tmp_path):
    path = tmp_path / "retrain.lock"
    # A crashed job: its process no longer exists.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead),
                                "started": time.time()}))  # fmt: skip
    lock = RetrainLock(path, ttl_s=3600, owner="new")
    assert "is gone" in (lock.acquire() or "")
    lock.release()
    # A job on another host that started longer ago than the TTL.
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time() - 100}))
    assert "older than" in (RetrainLock(path, ttl_s=10, owner="new").acquire() or "")
    # The same on another host within the TTL: held.
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time()}))
    with pytest.raises(LockHeld):
        RetrainLock(path, ttl_s=3600, owner="new").acquire()


def test_newest_manifest_and_run_key(tmp_path):
    for i, name in enumerate(["2026-01/manifest.json", "2026-03/manifest.json",
                              "2026-02/manifest.json"]):  # fmt: skip
        p = tmp_path / name
        p.parent.mkdir()
        p.write_text("{}")
        os.utime(p, (1000 + i, 1000 + i))
    assert newest_manifest(str(tmp_path / "*/manifest.json")).endswith("2026-02/manifest.json")
    assert newest_manifest("/fixed/manifest.json") == "/fixed/manifest.json"
    cfg = load_config("launch/recipes/tiny.yaml")
    key = run_key(cfg, "a" * 64, None)
    assert key == run_key(cfg, "a" * 64, None)
    assert key != run_key(cfg, "b" * 64, None) != run_key(cfg, "a" * 64, "3")
    changed = load_config("launch/recipes/tiny.yaml", ["run.max_steps=9"])
    assert run_key(changed, "a" * 64, None) != key
