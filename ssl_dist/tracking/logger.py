"""Rank 0 during training: `RunLogger`, non-blocking metric / tag / artifact logging through a
background thread with bounded buffers; and `NodeMetrics`, MLflow's own system-metrics monitor,
one per node."""

from __future__ import annotations

import collections
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

from ssl_dist.tracking.client import bound_http_client, bounded, client
from ssl_dist.tracking.run import START_TIMEOUT_S, find_or_create_run, log_params


class RunLogger:
    """Non-blocking metric and artifact logging for rank 0.

    `metrics()`, `tags()` and `artifacts()` only append to in-memory buffers; a daemon thread
    sends them. When the server cannot be reached the thread warns once, keeps at most `max_metrics`
    metric values (oldest dropped first, and counted) and the newest `max_artifact_sets`
    artifact sets, and retries with backoff. If no run id is known yet (tracking was down when
    the driver started) the thread finds or creates the run once the server answers.
    """

    def __init__(
        self,
        cfg,
        uri: str,
        run_id: str | None,
        max_metrics: int = 20000,
        max_artifact_sets: int = 2,
        retry_max_s: float = 10.0,
    ) -> None:
        self.cfg, self.uri, self.run_id = cfg, uri, run_id
        self.max_artifact_sets, self.retry_max_s = max_artifact_sets, retry_max_s
        self._metrics: collections.deque = collections.deque(maxlen=max_metrics)
        self._artifacts: list[tuple[Path, str]] = []
        self._tags: dict[str, str] = {}
        self._params: dict[str, str] = {}
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

    def params(self, values: dict[str, str]) -> None:
        """Log params (write-once: a value that differs from the run's is recorded in a tag)."""
        with self._cond:
            self._params.update(values)
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
            left = len(self._metrics) + len(self._artifacts) + len(self._tags) + len(self._params)
        if left or self.dropped_metrics or self.dropped_artifacts:
            warnings.warn(
                f"MLflow: {left} buffered items not sent, {self.dropped_metrics} "
                f"metric values and {self.dropped_artifacts} checkpoint artifact sets "
                f"dropped while the server was unreachable (last error: "
                f"{self.last_error})",
                stacklevel=2,
            )
        if not self._thread.is_alive():
            shutil.rmtree(self._tmp, ignore_errors=True)
        return left == 0

    # the sender thread
    def _pending(self) -> bool:
        return bool(self._metrics or self._artifacts or self._tags or self._params)

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not (self._pending() or self._closing):
                    self._cond.wait()
                if self._closing and not self._pending():
                    return
            try:
                self._send()
                if self._warned:
                    print(
                        f"MLflow: reachable again at {self.uri}; buffered metrics sent", flush=True
                    )
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
            params, self._params = self._params, {}
        if params:
            try:
                log_params(c, c.get_run(self.run_id), params)
            except Exception:
                with self._cond:  # sent again on the next try
                    self._params = {**params, **self._params}
                raise
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
