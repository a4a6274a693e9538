"""MLflow tracking: one MLflow run per logical training run, written by rank 0 only.

Who writes what:

- the driver (`ssl-dist pretrain`) finds or creates the run before any worker starts, logs the
  resolved config as params and the lineage tags; at the end it logs the figures and the encoder
  as an MLflow model, and registers it under `tracking.model_name` with `tracking.alias`;
- rank 0 of the workers logs per-step and per-epoch metrics, system metrics and the checkpoint
  artifacts through `RunLogger`, a background thread with a bounded buffer, so that a slow or
  dead tracking server never blocks a training step.

A run is identified by the tag ``ssl_dist.run_key`` = ``<storage_path>/<run.name>``: a restart
after a failure, or the same run name started again, finds the same MLflow run. Its id is also
kept in every Ray checkpoint (`TrainState.mlflow_run_id`).

Tracking targets: a sqlite database in the run storage folder by default (nothing to start), or
any `http(s)://` tracking server; credentials come from MLflow's own environment variables
(`MLFLOW_TRACKING_TOKEN`, `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, ...).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from ssl_dist.artifact import CONFIG, ENCODER
from ssl_dist.config import flatten
from ssl_dist.data.shards import manifest_sha256
from ssl_dist.models import encoders
from ssl_dist.train.checkpoint import TrainState

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
        warnings.warn(f"MLflow: {what} took over {timeout_s:.0f}s; going on without it",
                      stacklevel=2)  # fmt: skip
        return None
    if "error" in box:
        e = box["error"]
        warnings.warn(f"MLflow: {what} failed ({type(e).__name__}: {e}); going on without it",
                      stacklevel=2)  # fmt: skip
        return None
    return box.get("value")


# --------------------------------------------------------------------------------------------
# The run: found by its key or created, with params and lineage tags


def run_key(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_run(mlflow_client, exp_id: str, key: str):
    """The run tagged with `key`, or None."""
    found = mlflow_client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = {_quote(key)}", max_results=1
    )
    return found[0] if found else None


def lineage_tags(cfg) -> dict[str, str]:
    """Tags that say what made the run: code, package versions, data, method, world size."""
    tags = {
        "ssl_dist.method": cfg.method.name,
        "ssl_dist.encoder": cfg.model.encoder,
        "ssl_dist.world_size": str(cfg.scaling.num_workers),
        "ssl_dist.data_manifest": cfg.data.manifest,
    }
    for pkg in ("ssl-dist", "torch", "ray", "deepspeed", "webdataset", "mlflow", "timm", "kornia"):
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            tags[f"version.{pkg}"] = "not installed"
    tags.update(git_tags())
    tags.update(manifest_tag(cfg.data.manifest))
    return tags


def manifest_tag(url: str) -> dict[str, str]:
    """``ssl_dist.data_manifest_sha256``: the digest of the manifest file's bytes (best effort:
    the stream reports a manifest it cannot read)."""
    try:
        return {"ssl_dist.data_manifest_sha256": manifest_sha256(url)}
    except Exception:  # noqa: BLE001 (lineage is best effort)
        return {}


def git_tags() -> dict[str, str]:
    """``git.sha`` and ``git.dirty`` of the checkout this package runs from (if it is one)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return {}
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.sha": sha, "git.dirty": str(bool(dirty)).lower()}


def _log_params(mlflow_client, run, params: dict[str, str]) -> None:
    """Log params not yet on the run. MLflow params are write-once: a continued run whose
    config changed keeps the first values, and the changes are recorded in a tag."""
    from mlflow.entities import Param, RunTag  # heavy (mlflow)

    have = run.data.params
    new = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
    changed = [f"{k}: {have[k]} -> {v}" for k, v in params.items() if k in have and have[k] != v]
    for i in range(0, len(new), 100):
        mlflow_client.log_batch(run.info.run_id, params=new[i : i + 100])
    if changed:
        tag = RunTag(f"ssl_dist.changed_at_resume_{len(run.data.tags)}", "; ".join(changed)[:5000])
        mlflow_client.log_batch(run.info.run_id, tags=[tag])


def find_or_create_run(cfg, uri: str) -> str:
    """Id of this training run's MLflow run: found by its key, else created. Params (the
    flattened config) and lineage tags are logged either way."""
    c = client(uri)
    exp_id = experiment_id(c, cfg.tracking.experiment, uri)
    key = run_key(cfg.run.storage_path, cfg.run.name)
    run = find_run(c, exp_id, key)
    if run is None:
        run = c.create_run(exp_id, run_name=cfg.run.name, tags={RUN_KEY_TAG: key})
    elif run.info.status != "RUNNING":
        c.update_run(run.info.run_id, status="RUNNING")
    _log_params(c, run, {k: str(v) for k, v in flatten(cfg).items()})
    c.set_tag(run.info.run_id, "ssl_dist.lineage", "see version.* and git.* tags")
    for k, v in lineage_tags(cfg).items():
        c.set_tag(run.info.run_id, k, v)
    return run.info.run_id


START_TIMEOUT_S = 30.0


def start_run(cfg) -> str | None:
    """Driver side, before the workers start: the MLflow run id, or None when tracking is off or
    unreachable (rank 0 then keeps trying in the background)."""
    if not cfg.tracking.enabled:
        return None
    uri = resolve_uri(cfg.tracking.uri, cfg.run.storage_path)
    return bounded(lambda: find_or_create_run(cfg, uri), START_TIMEOUT_S, f"start run at {uri}")


# --------------------------------------------------------------------------------------------
# Rank 0 during training: a background thread with a bounded buffer


class RunLogger:
    """Non-blocking metric and artifact logging for rank 0.

    `metrics()`, `tags()` and `artifacts()` only append to in-memory buffers; a daemon thread
    sends them. When the server cannot be reached the thread warns once, keeps at most `max_metrics`
    metric values (oldest dropped first, and counted) and the newest `max_artifact_sets`
    artifact sets, and retries with backoff. If no run id is known yet (tracking was down when
    the driver started) the thread finds or creates the run once the server answers.
    """

    def __init__(self, cfg, uri: str, run_id: str | None, max_metrics: int = 20000,
                 max_artifact_sets: int = 2, retry_max_s: float = 10.0) -> None:  # fmt: skip
        self.cfg, self.uri, self.run_id = cfg, uri, run_id
        self.max_artifact_sets, self.retry_max_s = max_artifact_sets, retry_max_s
        self._metrics: collections.deque = collections.deque(maxlen=max_metrics)
        self._artifacts: list[tuple[Path, str]] = []
        self._tags: dict[str, str] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="ssl-dist-mlflow-"))
        self._cond = threading.Condition()
        self._closing = False
        self._close_by = float("inf")
        self.dropped_metrics = 0
        self.dropped_artifacts = 0
        self.sent_metrics = 0
        self.failures = 0
        self.last_error: str | None = None
        self._warned = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="mlflow-logger")
        self._thread.start()

    # called from the training loop: never blocks on the network
    def metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric  # heavy (mlflow), loaded once by the first call

        ts = int(time.time() * 1000)
        with self._cond:
            for k, v in values.items():
                if len(self._metrics) == self._metrics.maxlen:
                    self.dropped_metrics += 1
                self._metrics.append(Metric(k, float(v), ts, step))
            self._cond.notify()

    def tags(self, values: dict[str, str]) -> None:
        """Set run tags (the newest value of each is sent)."""
        with self._cond:
            self._tags.update(values)
            self._cond.notify()

    def artifacts(self, files: list[Path], artifact_path: str) -> None:
        """Copy `files` now (the caller may delete them) and upload them under `artifact_path`."""
        dest = self._tmp / artifact_path.replace("/", "__")
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / Path(f).name)
        with self._cond:
            self._artifacts.append((dest, artifact_path))
            while len(self._artifacts) > self.max_artifact_sets:
                old, _ = self._artifacts.pop(0)
                shutil.rmtree(old, ignore_errors=True)
                self.dropped_artifacts += 1
            self._cond.notify()

    def close(self, timeout_s: float = 30.0) -> bool:
        """Send what is buffered within `timeout_s`; True when everything was sent."""
        with self._cond:
            self._closing = True
            self._close_by = time.monotonic() + timeout_s
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            left = len(self._metrics) + len(self._artifacts) + len(self._tags)
        if left or self.dropped_metrics or self.dropped_artifacts:
            warnings.warn(f"MLflow: {left} buffered items not sent, {self.dropped_metrics} "
                          f"metric values and {self.dropped_artifacts} checkpoint artifact sets "
                          f"dropped while the server was unreachable (last error: "
                          f"{self.last_error})", stacklevel=2)  # fmt: skip
        if not self._thread.is_alive():
            shutil.rmtree(self._tmp, ignore_errors=True)
        return left == 0

    # the sender thread
    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not (self._metrics or self._artifacts or self._tags or self._closing):
                    self._cond.wait()
                if self._closing and not (self._metrics or self._artifacts or self._tags):
                    return
            try:
                self._send()
                if self._warned:
                    print(f"MLflow: reachable again at {self.uri}; buffered metrics sent",
                          flush=True)  # fmt: skip
                    self._warned = False
                backoff = 0.5
            except Exception as e:  # noqa: BLE001 (tracking never breaks training)
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                if not self._warned:
                    warnings.warn(
                        f"MLflow: cannot log to {self.uri} ({type(e).__name__}: {e}); training "
                        f"goes on, keeping up to {self._metrics.maxlen} metric values and "
                        f"{self.max_artifact_sets} checkpoint artifact sets to retry",
                        stacklevel=1,
                    )
                    self._warned = True
                with self._cond:
                    left = self._close_by - time.monotonic()
                    if left <= 0:
                        return  # close() reports what is left
                    self._cond.wait(min(backoff, left))
                backoff = min(backoff * 2, self.retry_max_s)

    def _send(self) -> None:
        c = client(self.uri)
        if self.run_id is None:
            self.run_id = find_or_create_run(self.cfg, self.uri)
        while True:
            with self._cond:
                batch = [self._metrics[i] for i in range(min(len(self._metrics), 1000))]
            if not batch:
                break
            c.log_batch(self.run_id, metrics=batch)
            sent = {id(m) for m in batch}
            with self._cond:  # the deque may have dropped some of them meanwhile
                while self._metrics and id(self._metrics[0]) in sent:
                    self._metrics.popleft()
                self.sent_metrics += len(batch)
        with self._cond:
            tags = dict(self._tags)
        if tags:
            from mlflow.entities import RunTag  # heavy (mlflow)

            c.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            with self._cond:  # unless a newer value came meanwhile
                for k, v in tags.items():
                    if self._tags.get(k) == v:
                        del self._tags[k]
        while True:
            with self._cond:
                if not self._artifacts:
                    break
                folder, path = self._artifacts[0]
            c.log_artifacts(self.run_id, str(folder), artifact_path=path)
            with self._cond:
                if self._artifacts and self._artifacts[0][0] == folder:
                    self._artifacts.pop(0)
            shutil.rmtree(folder, ignore_errors=True)


class NodeMetrics:
    """MLflow's own system-metrics monitor for one node (CPU, memory, disk, network, and each
    GPU's utilisation and memory through pynvml), logged to the run as
    ``system/<node_id>/<metric>``. One per node: the worker with local rank 0 starts it.

    Starting and stopping are bounded like every tracking call; when the server cannot be
    reached the monitor is simply absent (MLflow's monitor also ends itself for good at its
    first failed call, so an outage costs the rest of that segment's system metrics, never a
    training step)."""

    def __init__(self, uri: str, run_id: str, node_id: str, interval_s: float) -> None:
        def start():
            from mlflow.system_metrics.system_metrics_monitor import (  # heavy (mlflow)
                SystemMetricsMonitor,
            )

            bound_http_client()
            monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=interval_s,
                resume_logging=True,
                node_id=node_id,
                tracking_uri=uri,
            )
            monitor.start()
            return monitor

        self.node_id = node_id
        self._monitor = bounded(start, START_TIMEOUT_S, f"start system metrics on {node_id}")

    def close(self, timeout_s: float) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            bounded(monitor.finish, timeout_s, f"stop system metrics on {self.node_id}")


# --------------------------------------------------------------------------------------------
# Driver side at the end: figures, the encoder as an MLflow model, the registry

FINISH_TIMEOUT_S = 300.0
MODEL_NAME_IN_RUN = "encoder"


def curves_figure(mlflow_client, run_id: str):
    """Loss and learning-rate curves from the run's metric history (every restart included)."""
    import matplotlib  # heavy (a second), and only the driver draws, once per run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("loss", "lr"), strict=True):
        hist = sorted(mlflow_client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], lw=1)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def embedding_figure(features: Tensor, labels: Tensor, classes: list[str]):
    """2-D PCA of the val split's features, coloured by class."""
    import matplotlib  # heavy (a second), and only the driver draws, once per run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = features - features.mean(0)
    _, _, v = torch.pca_lowrank(x, q=2, center=False)
    xy = (x @ v[:, :2]).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        sel = (labels == c).numpy()
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(c % cmap.N), label=name)
    ax.set_title("val split, encoder features (PCA)")
    ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


@dataclass
class EncoderSample:
    """What the driver hands to :func:`finish_run` about the trained encoder, so that tracking
    never builds a data pipeline or an encoder itself
    (:func:`ssl_dist.evaluate.embedding.encoder_sample` makes one)."""

    features: Tensor
    """Encoder features ``[N, F]`` of (up to a few thousand) val samples, for the PCA figure."""
    labels: Tensor
    """Their classes ``[N]``."""
    classes: list[str]
    """Class names (the manifest's)."""
    example: np.ndarray
    """A model input ``[2, C, H, W]`` float32 (the plain view): the model's input example."""
    example_features: np.ndarray
    """The encoder's output for `example`: with it, the model's signature."""


def finish_run(
    cfg, checkpoint_dir: Path, final_metrics: dict[str, float], sample: EncoderSample | None = None
) -> dict | None:
    """Driver side, after training: figures, the MLflow model, the registered version + alias.

    `sample` gives the embedding figure and the model's input example and signature (without
    it the model is logged without them).

    Bounded and never raising: returns ``{"run_id", "model_uri", "version"}`` or None.
    """
    if not cfg.tracking.enabled:
        return None
    uri = resolve_uri(cfg.tracking.uri, cfg.run.storage_path)
    return bounded(lambda: _finish(cfg, uri, Path(checkpoint_dir), final_metrics, sample),
                   FINISH_TIMEOUT_S, f"register the encoder at {uri}")  # fmt: skip


def _finish(
    cfg, uri: str, ckpt: Path, final_metrics: dict[str, float], sample: EncoderSample | None
) -> dict:
    import mlflow  # heavy (mlflow)

    c = client(uri)
    state = TrainState.read(ckpt)
    run_id = state.mlflow_run_id or find_or_create_run(cfg, uri)
    step = state.step
    numeric = {k: float(v) for k, v in final_metrics.items() if isinstance(v, int | float)}
    for k, v in numeric.items():
        c.log_metric(run_id, f"final/{k}", v, step=step)
    c.set_tag(run_id, "ssl_dist.resumed_at", ",".join(map(str, state.resumed_at)) or "none")
    if step < int(final_metrics.get("total_steps", step)):
        # A time-boxed segment (run.stop_at_step): the run goes on later under the same name.
        c.set_tag(run_id, "ssl_dist.paused_at_step", str(step))
        return {"run_id": run_id, "paused_at_step": step}
    name = cfg.tracking.model_name
    done = [v for v in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            if v.tags.get("ssl_dist.step") == str(step)]  # fmt: skip
    if done:
        # Finished before (a job that crashed after registering and is run again): the same
        # version, not a duplicate.
        version = max(done, key=lambda v: int(v.version))
        if cfg.tracking.alias.lower() != "latest":
            c.set_registered_model_alias(name, cfg.tracking.alias, version.version)
        c.set_terminated(run_id, "FINISHED")
        return {"run_id": run_id, "model_uri": version.source, "version": version.version,
                "registered": f"models:/{name}@{cfg.tracking.alias}"}  # fmt: skip
    c.log_figure(run_id, curves_figure(c, run_id), "figures/loss_lr.png")
    if sample is not None:
        figure = embedding_figure(sample.features, sample.labels, sample.classes)
        c.log_figure(run_id, figure, "figures/embedding_pca.png")

    with mlflow_uris(uri):  # log_model and register_model read the process-wide URIs
        with mlflow.start_run(run_id=run_id):
            info = log_encoder_model(ckpt, sample)
        version = mlflow.register_model(info.model_uri, cfg.tracking.model_name)
    tags = {"ssl_dist.run_key": run_key(cfg.run.storage_path, cfg.run.name),
            "ssl_dist.step": str(step), "ssl_dist.method": cfg.method.name,
            "ssl_dist.data_manifest": cfg.data.manifest}  # fmt: skip
    tags.update(manifest_tag(cfg.data.manifest))
    for k, v in tags.items():
        c.set_model_version_tag(cfg.tracking.model_name, version.version, k, v)
    if cfg.tracking.alias.lower() != "latest":
        # MLflow reserves `latest`: `models:/name@latest` always resolves to the newest version.
        c.set_registered_model_alias(cfg.tracking.model_name, cfg.tracking.alias, version.version)
    c.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "model_uri": info.model_uri, "version": version.version,
            "registered": f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}"}  # fmt: skip


MODEL_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pyyaml")
"""What the registered model imports (besides mlflow, which MLflow adds itself)."""


def model_requirements() -> list[str]:
    """Pins for the registered model's environment: each of `MODEL_REQUIREMENTS` at the version
    installed here, without a local build label (``2.14.1+cu130`` -> ``2.14.1``, which package
    indexes serve). ssl-dist itself is not among them: the model ships the code it needs."""
    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in MODEL_REQUIREMENTS]


def log_encoder_model(checkpoint_dir: Path, sample: EncoderSample | None = None):
    """Log the encoder artifact in `checkpoint_dir` as a pyfunc model of the active MLflow run:
    the code file `ssl_dist/mlflow_model.py`, the architecture as ``code/ssl_dist_encoders.py``,
    the weights (safetensors) and config as artifacts, pinned requirements, and (with `sample`)
    an input example and the signature example -> features. Returns MLflow's ``ModelInfo``."""
    # heavy (mlflow); mlflow_model imports mlflow at its top
    import mlflow
    from mlflow.models import infer_signature

    from ssl_dist.mlflow_model import ARCH_MODULE

    ckpt = Path(checkpoint_dir)
    example, signature = None, None
    if sample is not None:
        example = sample.example
        signature = infer_signature(sample.example, sample.example_features)
    with tempfile.TemporaryDirectory(prefix="ssl-dist-model-code-") as tmp:
        arch = Path(tmp) / f"{ARCH_MODULE}.py"
        shutil.copyfile(encoders.__file__, arch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                code_paths=[str(arch)],
                artifacts={"encoder": str(ckpt / ENCODER), "config": str(ckpt / CONFIG)},
                pip_requirements=model_requirements(),
                signature=signature,
                input_example=example,
            )


def ui_command(uri: str, run_id: str | None = None) -> str:
    """The command that opens the MLflow UI on this store (on the run's page when given)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = base
    if run_id:
        try:
            experiment = client(uri).get_run(run_id).info.experiment_id
            page = f"{base}/#/experiments/{experiment}/runs/{run_id}"
        except Exception:  # noqa: BLE001 - the plain address still helps
            pass
    if uri.startswith(("http://", "https://")):
        return f"open {page}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000  # then open {page}"
