"""The retrain lock and the newest-manifest pick, without training anything."""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from ssl_dist.config import load_config
from ssl_dist.retrain_lock import LockHeld, RetrainLock


@pytest.mark.unit
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


@pytest.mark.unit
def test_stale_locks_are_taken_over(tmp_path):
    path = tmp_path / "retrain.lock"
    # A crashed job: its process no longer exists (no pid can exceed the kernel's pid_max).
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    path.write_text(
        json.dumps({"host": os.uname().nodename, "pid": int(dead), "started": time.time()})
    )
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


@pytest.mark.unit
def test_a_lock_taken_over_is_not_released_by_its_old_holder(tmp_path):
    path = tmp_path / "retrain.lock"
    old = RetrainLock(path, ttl_s=3600, owner="old")
    assert old.acquire() is None
    new = RetrainLock(path, ttl_s=-1, owner="new")  # every lock is past this TTL
    assert "older than" in (new.acquire() or "")
    old.release()  # a hung job that finally ends
    assert json.loads(path.read_text())["owner"] == "new"
    new.release()
    assert not path.exists()
    assert RetrainLock(path, ttl_s=3600, owner="next").acquire() is None


@pytest.mark.unit
def test_newest_manifest_and_run_key(tmp_path):
    # Here, not at the top: the race below preloads this module in every contender, and the
    # retrain job loads torch, Ray's driver side and MLflow's client.
    from ssl_dist.retrain import newest_manifest, run_key

    for i, name in enumerate(
        ["2026-01/manifest.json", "2026-03/manifest.json", "2026-02/manifest.json"]
    ):
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


def _contend(path, rounds, barrier, wins):
    """One contender: every round, try to take the lock, hold it until every contender has
    tried, then let it go. An error breaks the barrier, so that the test fails at once."""
    try:
        for r in range(rounds):
            barrier.wait()  # round r's stale lock is in place
            lock = RetrainLock(path, ttl_s=60, owner=f"contender {os.getpid()}")
            with contextlib.suppress(LockHeld):
                lock.acquire()
            if lock.held:
                with wins.get_lock():
                    wins[r] += 1
            barrier.wait()  # everyone has tried
            lock.release()
            barrier.wait()  # the winner has let go
    except BaseException:
        barrier.abort()
        raise


@pytest.mark.slow
def test_one_winner_when_many_jobs_take_over_a_stale_lock(tmp_path):
    """8 processes race for the same stale lock, 300 times: exactly one may win each time.
    The contenders live through all rounds, synchronised by a barrier."""
    contenders, rounds = 8, 300
    path = tmp_path / "retrain.lock"
    ctx = multiprocessing.get_context("forkserver")  # nothing inherited from earlier tests
    ctx.set_forkserver_preload([__name__])  # imported once, not in every contender
    barrier = ctx.Barrier(contenders + 1, timeout=60)
    wins = ctx.Array("i", rounds)
    procs = [
        ctx.Process(target=_contend, args=(path, rounds, barrier, wins), daemon=True)
        for _ in range(contenders)
    ]
    for p in procs:
        p.start()
    left_behind = []
    try:
        for r in range(rounds):
            stale = {"host": "elsewhere", "pid": 1, "started": time.time() - 3600, "owner": r}
            path.write_text(json.dumps(stale))
            barrier.wait()
            barrier.wait()
            barrier.wait()
            if path.exists():
                left_behind.append(r)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * contenders
    winners = collections.Counter(wins[:])
    assert winners == {1: rounds}, f"rounds by number of winners: {dict(winners)}"
    assert left_behind == [], "the winner's release left the lock behind"
