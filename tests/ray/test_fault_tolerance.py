"""A training worker killed mid-run on a two-node local Ray cluster: the group restarts from the
last checkpoint and the run ends with its planned step count."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ssl_dist.train.checkpoint import STATE
from ssl_dist.train.driver import pretrain

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _kill_a_worker_after_checkpoint(run_dir: Path, min_step: int, killed: list) -> None:
    import psutil

    deadline = time.time() + 240
    first_seen: dict = {}
    while time.time() < deadline and not killed:
        states = list(run_dir.glob(f"checkpoint_*/{STATE}"))
        steps = [json.loads(p.read_text())["step"] for p in states]
        # The controller takes in reported checkpoints when it polls the workers (every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): give it a few polls before the kill.
        if (
            steps
            and max(steps) >= min_step
            and time.time() - first_seen.setdefault("t", time.time()) > 2
        ):
            # Ray titles each actor process "ray::<Class>...".
            workers = [
                p.pid
                for p in psutil.process_iter(["cmdline"])
                if any("ray::RayTrainWorker" in c for c in p.info["cmdline"] or [])
            ]
            if workers:
                pid = max(workers)
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, max(steps)))
                return
        time.sleep(0.1)


def test_killed_worker_resumes_and_finishes(two_node_cluster, tiny_cfg, tmp_path):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    cfg = tiny_cfg(
        "run.name=ft",
        "run.max_steps=100",
        "run.epochs=10",
        "run.checkpoint_every=5",
        "run.max_failures=2",
        "method.name=moco_v2",
        "zero.stage=1",
    )
    killed: list = []
    watcher = threading.Thread(
        target=_kill_a_worker_after_checkpoint,
        args=(Path(cfg.run.storage_path) / "ft", 5, killed),
        daemon=True,
    )
    watcher.start()
    final = Path(pretrain(cfg)[0])
    watcher.join(timeout=5)
    assert killed, "the run finished before a worker could be killed"
    state = json.loads((final / STATE).read_text())
    assert state["step"] == 100, (state, killed)
    assert state["resumed_at"], "the run did not resume from a checkpoint"
    # Resumed from a checkpoint the controller had registered before the kill.
    assert 5 <= state["resumed_at"][0] <= killed[0][1] and state["resumed_at"][0] % 5 == 0
