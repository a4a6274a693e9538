"""Rank 0's MLflow logging during a worker's run, the kNN monitor's evaluation, and MLflow's
system-metrics monitor on each node's first worker: the one place the worker loop meets
:mod:`ssl_dist.tracking`."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import torch

from ssl_dist import tracking
from ssl_dist.artifact import CONFIG, ENCODER
from ssl_dist.config import Config
from ssl_dist.data.damage import EpochDamage
from ssl_dist.dist import zero
from ssl_dist.evaluate.knn import knn_accuracy
from ssl_dist.train import checkpoint as ckpt


class Tracker:
    """Rank 0's MLflow logging (a `RunLogger`), the kNN monitor's evaluation, and MLflow's
    system-metrics monitor on each node's first worker (local rank 0: one per node). On other
    ranks, and with tracking off, every method does nothing (kNN still gathers ZeRO-3
    parameters on every rank, as that is a collective)."""

    def __init__(
        self,
        cfg: Config,
        state: ckpt.TrainState,
        driver_run_id: str | None,
        shards,
        views,
        device: torch.device,
        rank: int,
        local_rank: int,
    ) -> None:

        self.cfg, self.views, self.device, self.rank = cfg, views, device, rank
        self.num_classes = len(shards.manifest.classes)
        val = shards.manifest.splits.get(cfg.data.val_split)
        if views is not None and cfg.tracking.knn_every_epochs and not (val and val.samples):
            # No queries: the monitor would fail on rank 0 while the others wait for it.
            self.views = None  # every rank decides alike, from the manifest
            if rank == 0 and cfg.tracking.enabled:
                print(
                    f"kNN monitor off: the manifest has no {cfg.data.val_split!r} samples",
                    file=sys.stderr,
                )
        self.enabled = cfg.tracking.enabled
        self.logger = None
        self.node = None
        self.damaged: set[str] = set()
        if not self.enabled:
            return
        uri = tracking.resolve_uri(cfg.tracking.uri, cfg.run.storage_path)
        run_id = state.mlflow_run_id or driver_run_id
        if rank == 0:
            self.logger = tracking.RunLogger(cfg, uri, run_id)
        interval = cfg.tracking.system_metrics_s
        if local_rank == 0 and run_id is not None and interval > 0:
            self.node = tracking.NodeMetrics(uri, run_id, socket.gethostname(), interval)

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id if self.logger else None

    def step(self, step: int, values: dict[str, float], method_metrics: dict) -> None:
        if self.logger is None:
            return
        out = dict(values)
        out.update({f"method/{k}": float(v) for k, v in method_metrics.items()})
        if self.device.type == "cuda":
            out["system/gpu_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.logger.metrics(step, out)

    def params(self, values: dict[str, str]) -> None:
        """Params only a worker knows (the precision it resolved, ...), logged by rank 0."""
        if self.logger is not None:
            self.logger.params(values)

    def data(self, step: int, damage: EpochDamage) -> None:
        """An epoch's data counts: metrics (``data/...``) every epoch; on damage the report on
        stderr and the tag naming every damaged shard seen by this worker group."""
        if self.rank != 0:
            return
        for line in damage.lines():
            print(f"step {step}: {line}", file=sys.stderr)
        self.damaged.update(damage.damaged)
        if self.logger is None:
            return
        self.logger.metrics(step, damage.metrics())
        if damage.damaged:
            names = sorted(self.damaged)
            tag = ", ".join(names)
            if len(tag) > 4000:  # MLflow's limit on a tag value is 5000 characters
                tag = f"{tag[:4000].rsplit(', ', 1)[0]} ... ({len(names)} shards)"
            self.logger.tags({"ssl_dist.damaged_shards": tag})

    def world_size(self, step: int, size: int, history: list[list[int]]) -> None:
        """Logged at every (re)start: the metric's history is the run's world-size history;
        the tag holds it whole (``[step, size]`` pairs)."""
        if self.logger is not None:
            self.logger.metrics(step, {"world_size": float(size)})
            self.logger.tags({"ssl_dist.world_size_history": json.dumps(history)})

    def knn(self, method, step: int) -> None:
        if not self.enabled or self.cfg.tracking.knn_every_epochs == 0 or self.views is None:
            return

        encoder = method.encoder
        with zero.gathered(list(encoder.parameters())):
            if self.rank != 0:
                return
            t = time.perf_counter()
            acc = knn_accuracy(
                encoder,
                self.cfg.data,
                self.views,
                self.num_classes,
                self.device,
                max_bank=self.cfg.tracking.knn_bank,
            )
            secs = time.perf_counter() - t
        print(
            f"step {step}: kNN top-1 on {self.cfg.data.val_split} {acc:.1%} ({secs:.1f}s)",
            file=sys.stderr,
        )
        if self.logger is not None:
            self.logger.metrics(step, {"knn_top1": acc})

    def checkpoint(self, directory: Path, step: int) -> None:
        if self.logger is None:
            return
        files = [directory / ENCODER, directory / CONFIG, directory / ckpt.STATE]
        self.logger.artifacts(files, f"checkpoints/step-{step:08d}")

    def close(self) -> None:
        timeout = self.cfg.tracking.flush_timeout_s
        if self.node is not None:
            self.node.close(timeout)
        if self.logger is not None:
            self.logger.close(timeout_s=timeout)
