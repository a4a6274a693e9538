"""Shared fixtures: small shard sets written into tmp_path with real WebDataset tar files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_dist.data.shards import Manifest, write_shards
from ssl_dist.data.sources import Source, _array_split


def indexed_source(n_train: int, n_val: int = 0, size: int = 8, channels: int = 1) -> Source:
    """Images whose label is their own index, so a test can tell every sample apart."""
    rng = np.random.default_rng(0)
    shape = (size, size) if channels == 1 else (size, size, 3)
    splits = {}
    for name, n in (("train", n_train), ("val", n_val)):
        if n:
            images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            splits[name] = _array_split(name, images, np.arange(n))
    classes = [str(i) for i in range(max(n_train, n_val))]
    return Source("indexed", classes, channels, splits)


_PROCESS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def no_leaked_process_state():
    """Fails the test that leaves process-wide state changed for the tests after it: torch's
    grad mode, or MLflow's URIs (``mlflow.set_tracking_uri`` exports an environment variable).
    The state is put back either way, so one leak is reported once, where it happens."""
    env = {k: os.environ.get(k) for k in _PROCESS_ENV}
    yield
    leaked = []
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        leaked.append("torch grad mode left disabled")
    for key, value in env.items():
        if os.environ.get(key) != value:
            leaked.append(f"{key} changed to {os.environ.get(key)!r}")
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert not leaked, "; ".join(leaked)


@pytest.fixture
def make_shards(tmp_path: Path):
    """``make_shards(n_train, per_shard, n_val=0) -> (dir, manifest)``."""

    def make(n_train: int, per_shard: int, n_val: int = 0, name: str = "shards", **kw):
        out = tmp_path / name
        manifest: Manifest = write_shards(indexed_source(n_train, n_val, **kw), out, per_shard)
        return out, manifest

    return make


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite, served artifacts), killed afterwards."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.kill()
