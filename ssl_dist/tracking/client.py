"""MLflow connection: the tracking URI (sqlite in the run folder by default), the process-wide
URIs MLflow needs for models:/ (set and put back), a client with bounded HTTP calls, experiments,
and `bounded`: every tracking call runs under a time limit and never raises into training."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
RUN_KEY_TAG = "ssl_dist.run_key"
HTTP_TIMEOUT_S = "5"
"""Per-request timeout we set for MLflow's REST client unless the user set one."""


def resolve_uri(uri: str | None, storage_path: str) -> str:
    """The tracking URI to use: `uri`, else ``$MLFLOW_TRACKING_URI``, else a sqlite database
    ``<storage_path>/mlflow.db`` (artifacts beside it in ``mlartifacts/``)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in storage_path:
        raise ValueError(
            f"run.storage_path {storage_path!r} is remote: set tracking.uri (or "
            "MLFLOW_TRACKING_URI) to a tracking server"
        )
    folder = Path(storage_path).expanduser().resolve()
    return f"sqlite:///{folder / DEFAULT_DB}"


_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to `uri` inside the block, then put
    back as they were. Needed because MLflow resolves ``models:/name/version`` through the global
    registry URI only; restored because ``set_tracking_uri`` also exports
    ``MLFLOW_TRACKING_URI``, which would redirect every later default in this process."""
    import mlflow  # heavy (seconds): every MLflow import is deferred to its first use

    saved = {k: os.environ.get(k) for k in _URI_ENV}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments in a sqlite store: a folder beside the database.
    Servers choose their own (``--serve-artifacts``), so None there."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / DEFAULT_ARTIFACTS).as_uri()
    return None


def bound_http_client() -> None:
    """Cap MLflow's REST calls (default: 120 s timeout, 7 retries with backoff, i.e. minutes).
    Our callers retry themselves; explicit user settings are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def client(uri: str):
    """An `MlflowClient` for `uri` with bounded HTTP calls; a sqlite folder is created."""
    from mlflow import MlflowClient  # heavy (mlflow)

    bound_http_client()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with a local artifact root on sqlite) if missing."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # created meanwhile by another process
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T | None:
    """Run `fn` in a daemon thread; None (and a warning) if it fails or takes over `timeout_s`.
    Nothing on the tracking path may stop or stall training."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (reported below, never raised)
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"mlflow-{what}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        warnings.warn(
            f"MLflow: {what} took over {timeout_s:.0f}s; going on without it", stacklevel=2
        )
        return None
    if "error" in box:
        e = box["error"]
        warnings.warn(
            f"MLflow: {what} failed ({type(e).__name__}: {e}); going on without it", stacklevel=2
        )
        return None
    return box.get("value")
