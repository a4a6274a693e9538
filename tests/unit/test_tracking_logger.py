"""MLflow tracking without Ray: the run found again by its key, params write-once, the rank-0
logger buffering through a real server outage (killed, then back on the same port)."""

from __future__ import annotations

import time

import pytest

from ssl_dist import tracking
from ssl_dist.config import load_config
from tests.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow


def _cfg(tmp_path, *overrides):
    return load_config(
        "launch/recipes/tiny.yaml", [f"run.storage_path={tmp_path}/runs", *overrides]
    )


def test_default_uri_is_sqlite_in_storage(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_uri(None, str(tmp_path / "runs"))
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert tracking.artifact_root(uri) == (tmp_path / "runs" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_uri(None, str(tmp_path)) == "http://127.0.0.1:1"
    assert tracking.resolve_uri("http://h:2", str(tmp_path)) == "http://h:2"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="tracking.uri"):
        tracking.resolve_uri(None, "s3://bucket/runs")


def test_same_run_found_again_and_params_write_once(tmp_path):
    uri = tracking.resolve_uri(None, str(tmp_path / "runs"))
    cfg = _cfg(tmp_path, f"tracking.uri={uri}")
    first = tracking.find_or_create_run(cfg, uri)
    again = tracking.find_or_create_run(_cfg(tmp_path, f"tracking.uri={uri}", "optim.lr=0.5"), uri)
    other = tracking.find_or_create_run(_cfg(tmp_path, f"tracking.uri={uri}", "run.name=b"), uri)
    assert first == again != other
    run = tracking.client(uri).get_run(first)
    assert run.data.params["optim.lr"] == "0.1"  # write-once: the first value stays
    changed = [v for k, v in run.data.tags.items() if k.startswith("ssl_dist.changed_at_resume")]
    assert changed == ["optim.lr: 0.1 -> 0.5"]
    assert run.data.tags["ssl_dist.method"] == "simclr"
    assert run.data.tags["version.torch"].startswith("2.")
    assert run.data.tags[tracking.RUN_KEY_TAG].endswith("/runs/tiny")


def test_start_run_bounded_when_server_is_down(tmp_path):
    cfg = _cfg(tmp_path, f"tracking.uri=http://127.0.0.1:{free_port()}")
    t = time.perf_counter()
    with pytest.warns(UserWarning, match="MLflow: start run"):
        assert tracking.start_run(cfg) is None
    assert time.perf_counter() - t < tracking.START_TIMEOUT_S


def test_logger_buffers_through_an_outage(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        cfg = _cfg(tmp_path, f"tracking.uri={server.uri}")
        run_id = tracking.find_or_create_run(cfg, server.uri)
        c = tracking.client(server.uri)
        logger = tracking.RunLogger(cfg, server.uri, run_id, max_metrics=50, retry_max_s=0.5)
        for i in range(10):
            logger.metrics(i, {"loss": float(i)})
        _wait(lambda: len(c.get_metric_history(run_id, "loss")) == 10)

        server.kill()
        art = tmp_path / "ckpt"
        art.mkdir()
        (art / "encoder.safetensors").write_bytes(b"weights")
        t = time.perf_counter()
        for i in range(10, 100):
            logger.metrics(i, {"loss": float(i)})
        logger.artifacts([art / "encoder.safetensors"], "checkpoints/step-00000100")
        assert time.perf_counter() - t < 0.5, "logging blocked while the server was down"
        _wait(lambda: logger.failures >= 2)  # it retried, and is still holding the values
        assert logger.dropped_metrics == 40  # 90 values into a buffer of 50

        server.start()  # back on the same port and database
        assert logger.close(timeout_s=60)
        steps = [m.step for m in c.get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(10)) + list(range(50, 100))
        files = [f.path for f in c.list_artifacts(run_id, "checkpoints/step-00000100")]
        assert files == ["checkpoints/step-00000100/encoder.safetensors"]
    finally:
        server.kill()


def _wait(cond, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.2)


def test_logger_params_from_a_worker(tmp_path):
    # The precision a worker resolved: logged once, a different value at a resume kept in a tag.
    from mlflow.tracking import MlflowClient

    uri = tracking.resolve_uri(None, str(tmp_path / "runs"))
    cfg = _cfg(tmp_path, f"tracking.uri={uri}")
    run_id = tracking.find_or_create_run(cfg, uri)
    for used in ("bf16", "fp32"):
        logger = tracking.RunLogger(cfg, uri, run_id)
        logger.params({"zero.precision_used": used})
        assert logger.close(timeout_s=30)
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["zero.precision_used"] == "bf16"
    changed = [v for k, v in run.data.tags.items() if k.startswith("ssl_dist.changed_at_resume")]
    assert changed == ["zero.precision_used: bf16 -> fp32"]
