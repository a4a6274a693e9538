"""MLflow tracking of real 2-worker runs: a real `mlflow server` on 127.0.0.1, a run that is
stopped, continued and has a worker killed (still one MLflow run), and tracking outages that
must not stop training or damage its Ray checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import socket
import threading
import time
from pathlib import Path

import pytest

from ssl_dist import tracking
from ssl_dist.artifact import ENCODER, read_weights
from ssl_dist.train.checkpoint import STATE, is_complete
from ssl_dist.train.driver import pretrain
from tests.mlflow_server import MlflowServer, free_port
from tests.ray.test_fault_tolerance import _kill_a_worker_after_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]


# Long enough that the kill (2 s after a checkpoint at step >= 6 shows up) lands mid-run.
LAST = 40


def _runs(uri: str, cfg):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    key = tracking.run_key(cfg.run.storage_path, cfg.run.name)
    return c.search_runs([exp.experiment_id], f"tags.`{tracking.RUN_KEY_TAG}` = '{key}'")


def test_stopped_killed_resumed_run_is_one_mlflow_run(local_ray, tiny_cfg, mlflow_server):
    uri = mlflow_server.uri
    common = [
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        "tracking.alias=candidate",
        "tracking.model_name=tiny-encoder",
        "run.name=tracked",
        f"run.max_steps={LAST}",
        "run.epochs=5",
        "run.checkpoint_every=2",
        "run.max_failures=1",
        "tracking.system_metrics_s=1",
    ]
    # Segment 1: a time-boxed job stops at step 4 (checkpointed); nothing is registered yet.
    _, first = pretrain(tiny_cfg(*common, "run.stop_at_step=4"))
    assert first["mlflow"]["paused_at_step"] == 4
    run_id = first["mlflow"]["run_id"]
    # Segment 2: the same run name continues; a worker is killed after a checkpoint at >= 6.
    cfg = tiny_cfg(*common)
    killed: list = []
    watcher = threading.Thread(
        target=_kill_a_worker_after_checkpoint,
        args=(Path(cfg.run.storage_path) / "tracked", 6, killed),
        daemon=True,
    )
    watcher.start()
    path, metrics = pretrain(cfg)
    watcher.join(timeout=5)
    assert killed, "the run finished before a worker could be killed"
    state = json.loads((Path(path) / STATE).read_text())
    assert state["step"] == LAST and len(state["resumed_at"]) == 2, (state, killed)
    assert state["mlflow_run_id"] == run_id

    runs = _runs(uri, cfg)
    assert [r.info.run_id for r in runs] == [run_id], "restarts must not create new runs"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "simclr"
    # The precision the workers resolved (the tiny recipe pins fp32), logged by rank 0.
    assert run.data.params["zero.precision_used"] == "fp32"
    # The manifest is named by its file's bytes, on the run and on the registered version.
    digest = hashlib.sha256(Path(cfg.data.manifest).read_bytes()).hexdigest()
    assert run.data.tags["ssl_dist.data_manifest_sha256"] == digest
    assert run.data.tags["git.sha"] and run.data.tags["version.ray"]
    c = tracking.client(uri)
    # A continuous step axis: every step 1..LAST logged (steps redone after the kill, again).
    steps = {m.step for m in c.get_metric_history(run_id, "loss")}
    assert steps == set(range(1, LAST + 1))
    assert {m.step for m in c.get_metric_history(run_id, "lr")} == steps
    assert c.get_metric_history(run_id, "knn_top1"), "no kNN monitor value"
    # The InfoNCE bound, log(2 N_g - 1) - loss with N_g = 2 workers x 16 images, every step
    # (a loss is >= 0, so the bound is at most log N; below 0 while worse than chance).
    bound = c.get_metric_history(run_id, "method/infonce_bound_nats")
    assert {m.step for m in bound} == steps
    assert all(math.isfinite(m.value) and m.value <= math.log(2 * 32 - 1) for m in bound)
    # MLflow's own system-metrics monitor, one per node (both workers share this host).
    node = f"system/{socket.gethostname()}/cpu_utilization_percentage"
    assert c.get_metric_history(run_id, node), sorted(run.data.metrics)
    ckpts = {a.path for a in c.list_artifacts(run_id, "checkpoints")}
    assert {"checkpoints/step-00000004", f"checkpoints/step-{LAST:08d}"} <= ckpts
    saved = c.download_artifacts(run_id, f"checkpoints/step-{LAST:08d}/{ENCODER}")
    final = read_weights(Path(path) / ENCODER)
    assert read_weights(Path(saved)).keys() == final.keys()
    figures = {a.path for a in c.list_artifacts(run_id, "figures")}
    assert figures == {"figures/loss_lr.png", "figures/embedding_pca.png"}

    version = c.get_model_version_by_alias("tiny-encoder", "candidate")
    assert version.run_id == run_id and version.tags["ssl_dist.step"] == str(LAST)
    assert version.tags["ssl_dist.data_manifest_sha256"] == digest
    assert metrics["mlflow"]["registered"] == "models:/tiny-encoder@candidate"

    # The registered model serves features through MLflow's own loader (no pickle involved).
    import mlflow
    import numpy as np

    from ssl_dist.tracking import mlflow_uris

    with mlflow_uris(uri):
        model = mlflow.pyfunc.load_model("models:/tiny-encoder@candidate")
    x = np.zeros((2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), np.float32)
    assert model.predict(x).shape == (2, 8)  # thin ResNet, last width 8

    # The downstream job picks the version up by alias; its run links back to it.
    from ssl_dist.evaluate.finetune import run_finetune

    data_dir = Path(cfg.data.manifest).parent
    probe = run_finetune("models:/tiny-encoder@candidate", data_dir, "linear", tracking_uri=uri)
    assert 0.1 < probe["top1"] <= 1.0
    linked = c.get_run(probe["mlflow_run_id"])
    assert linked.data.tags["ssl_dist.source_model_version"] == version.version
    assert linked.data.tags["ssl_dist.source_run_id"] == run_id
    tagged = c.get_model_version("tiny-encoder", version.version).tags
    assert float(tagged["linear_top1"]) == pytest.approx(probe["top1"])


def test_tracking_down_at_start_and_killed_mid_run(local_ray, tiny_cfg, tmp_path):
    # 1. Nothing listens at the tracking URI: training runs and checkpoints as usual.
    dead = f"http://127.0.0.1:{free_port()}"
    # A short flush at the end: what matters is that training finishes, not the retries.
    cfg = tiny_cfg(
        "tracking.enabled=true",
        f"tracking.uri={dead}",
        "run.name=down",
        "tracking.flush_timeout_s=5",
    )
    t = time.perf_counter()
    with pytest.warns(UserWarning, match="MLflow"):
        path, metrics = pretrain(cfg)
    assert time.perf_counter() - t < 150
    _intact(path, 4)
    assert "mlflow" not in metrics

    # 2. The server answers at first, then dies mid-run (SIGKILL, for good). A MoCo v3 run: its
    # InfoNCE bound must have reached the server before the kill.
    server = MlflowServer(tmp_path / "server").start()
    cfg = tiny_cfg(
        "tracking.enabled=true",
        f"tracking.uri={server.uri}",
        "method.name=moco_v3",
        "run.name=dies",
        "run.max_steps=40",
        "run.epochs=10",
        "run.checkpoint_every=10",
        "tracking.flush_timeout_s=5",
    )
    c = tracking.client(server.uri)
    bounds: list = []

    def kill_after_first_metrics() -> None:
        deadline = time.time() + 200
        while time.time() < deadline:
            try:
                runs = _runs(server.uri, cfg)
                run_id = runs[0].info.run_id if runs else None
                if run_id and c.get_metric_history(run_id, "loss"):
                    bounds.extend(c.get_metric_history(run_id, "method/infonce_bound_nats"))
                    server.kill()
                    return
            except Exception:  # noqa: BLE001 (not there yet)
                pass
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_metrics, daemon=True)
    killer.start()
    try:
        with pytest.warns(UserWarning, match="MLflow"):
            path, metrics = pretrain(cfg)
        killer.join(timeout=5)
        assert server.proc is None, "the server was not killed during the run"
        # Logged with the loss: log(N_g) - L, N_g = 32 keys per query.
        assert bounds and all(math.isfinite(m.value) and m.value <= math.log(32) for m in bounds)
        _intact(path, 40)
        assert "mlflow" not in metrics
    finally:
        server.kill()


def _intact(path, steps: int) -> None:
    d = Path(path)
    assert is_complete(d)
    assert json.loads((d / STATE).read_text())["step"] == steps
    assert read_weights(d / ENCODER)
