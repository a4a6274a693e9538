"""An elastic run (`scaling.num_workers: [1, 3]`) on a local Ray cluster of 1-CPU nodes: a node
joins (the group restarts with 3 workers), then leaves (the group restarts with 2); each restart
resumes from the last checkpoint with the ZeRO-1 state re-sharded, and the run ends with exactly
its planned step count and the world-size history in its train state and in MLflow.

About 2 minutes on 2 cores (seen: 2 -> 3 at step 35, 3 -> 2 at step 45, of 200). Ray Train sizes
the group from Ray's AutoscalingCoordinator, which re-reads the cluster's nodes every 20 s; the
test asks it to re-read right after each change instead of waiting (``_refresh_coordinator``),
and its elastic policy checks every second (``$SSL_DIST_ELASTIC_RESIZE_INTERVAL_S``). After the
node leaves, the controller usually restarts before that re-read and first asks for 3 workers
again: that attempt waits ``$RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (10 s here, 60 s by
default) and the next one starts 2.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest

from ssl_dist import tracking
from ssl_dist.train.checkpoint import STATE
from ssl_dist.train.driver import ELASTIC_RESIZE_INTERVAL_ENV, pretrain
from tests.ray.conftest import two_nodes

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_STEPS = 200


@pytest.fixture
def elastic_cluster(monkeypatch):
    import ray

    monkeypatch.setenv(ELASTIC_RESIZE_INTERVAL_ENV, "1")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    # The nodes are added from a thread while the driver trains in the main thread (Ray Train
    # installs its SIGINT handler there); a Node's SIGTERM hook can only be set in the main one.
    monkeypatch.setattr(ray._private.utils, "set_sigterm_handler", lambda handler: None)
    with two_nodes() as cluster:
        yield cluster


def _states(run_dir: Path) -> list[dict]:
    out = []
    for p in run_dir.glob(f"checkpoint_*/{STATE}"):
        with contextlib.suppress(OSError, ValueError):  # being written, or deleted (num_to_keep)
            out.append(json.loads(p.read_text()))
    return out


def _wait_for(run_dir: Path, done: threading.Event, test, timeout: float = 240) -> dict | None:
    """The first checkpoint state for which `test` holds, then 2 s more: the controller takes
    in a reported checkpoint when it next polls the workers."""
    deadline = time.time() + timeout
    while time.time() < deadline and not done.is_set():
        hits = [s for s in _states(run_dir) if test(s)]
        if hits:
            time.sleep(2)
            return max(hits, key=lambda s: s["step"])
        time.sleep(0.2)
    return None


def _refresh_coordinator() -> None:
    """Ray Train sizes the group from Ray's AutoscalingCoordinator (a ray.data actor), which
    re-reads the cluster's nodes every 20 s; ask it to do so now, as its next tick would, so that
    the test does not wait for the tick."""
    import ray

    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("ssl-dist-test", True), timeout=30)


def _grow_then_shrink(cluster, run_dir: Path, done: threading.Event, events: list) -> None:
    import ray

    seen = _wait_for(run_dir, done, lambda s: s["step"] >= 5 and s["world_size"] == 2)
    if seen is None:
        return
    node = cluster.add_node(num_cpus=1)
    _refresh_coordinator()
    events.append(("added", seen["step"], time.time()))
    print(f"EVENT added at step {seen['step']} {time.strftime('%X')}", flush=True)
    seen = _wait_for(run_dir, done, lambda s: s["world_size"] == 3)
    if seen is None:
        return
    cluster.remove_node(node)
    t = time.time()
    while any(n["NodeID"] == node.unique_id and n["Alive"] for n in ray.nodes()):
        time.sleep(0.2)
    _refresh_coordinator()
    events.append(("removed", seen["step"], time.time()))
    print(
        f"EVENT removed at step {seen['step']} {time.strftime('%X')} "
        f"(dead after {time.time() - t:.1f}s)",
        flush=True,
    )


def _changes(sizes: list[int]) -> list[int]:
    return [w for i, w in enumerate(sizes) if i == 0 or sizes[i - 1] != w]


def test_node_joins_then_leaves(elastic_cluster, tiny_cfg):
    cfg = tiny_cfg(
        "run.name=elastic",
        "scaling.num_workers=[1,3]",
        "zero.stage=1",
        "method.name=moco_v2",
        "method.queue_size=96",
        f"run.max_steps={MAX_STEPS}",
        "run.epochs=100",
        "run.checkpoint_every=5",
        "run.log_every=5",
        "run.max_failures=3",
        "tracking.enabled=true",
        "tracking.knn_every_epochs=0",
    )
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    done, events = threading.Event(), []
    watcher = threading.Thread(
        target=_grow_then_shrink, args=(elastic_cluster, run_dir, done, events), daemon=True
    )
    watcher.start()
    t0 = time.time()
    try:
        path, metrics = pretrain(cfg)
    finally:
        done.set()
        watcher.join(timeout=30)
    print(f"elastic run: {time.time() - t0:.0f}s, events {events}")
    assert [e[0] for e in events] == ["added", "removed"], events

    state = json.loads((Path(path) / STATE).read_text())
    assert state["step"] == MAX_STEPS and metrics["step"] == MAX_STEPS
    history = state["world_sizes"]
    assert [w for _, w in history] == [2, 3, 2], (history, state["resumed_at"])
    steps = [s for s, _ in history]
    assert steps[0] == 0 and steps == sorted(steps) and len(set(steps)) == 3
    # Each size change is a resume from a checkpoint (every 5 steps).
    assert set(steps[1:]) <= set(state["resumed_at"]) and all(s % 5 == 0 for s in steps)
    assert steps[1] >= events[0][1] and steps[2] >= events[1][1]

    uri = tracking.resolve_uri(None, cfg.run.storage_path)
    client = tracking.client(uri)
    run_id = state["mlflow_run_id"]
    logged = sorted(client.get_metric_history(run_id, "world_size"), key=lambda m: m.timestamp)
    assert _changes([int(m.value) for m in logged]) == [2, 3, 2]
    assert [m.step for m in logged][0] == 0
    tag = client.get_run(run_id).data.tags["ssl_dist.world_size_history"]
    assert json.loads(tag) == history
    # The loss was logged over the whole run, every 5 steps, up to the end.
    losses = client.get_metric_history(run_id, "loss")
    assert max(m.step for m in losses) == MAX_STEPS
