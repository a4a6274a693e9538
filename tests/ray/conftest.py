"""Local Ray for the pretrain tests: one instance per module, shards written into tmp_path."""

from __future__ import annotations

import contextlib
import os

import pytest

from ssl_dist.config import load_config
from ssl_dist.data.shards import write_shards
from ssl_dist.data.sources import digits

os.environ.setdefault("SSL_DIST_NO_PROGRESS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The controller notices finished or failed workers at this poll interval (default 2 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-shards")
    write_shards(digits(), out, samples_per_shard=100)
    return out


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def tiny_cfg(digits_shards, tmp_path):
    """``tiny_cfg(*overrides)``: the tiny recipe on digits shards, storage in tmp_path, MLflow
    off unless an override turns it on."""

    def make(*overrides: str):
        return load_config(
            "launch/recipes/tiny.yaml",
            [
                f"data.manifest={digits_shards}/manifest.json",
                "tracking.enabled=false",
                f"run.storage_path={tmp_path}/runs",
                *overrides,
            ],
        )

    return make


@contextlib.contextmanager
def two_nodes():
    """A local Ray cluster of two 1-CPU nodes (head + one), connected; shut down after."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=True)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def two_node_cluster():
    with two_nodes() as cluster:
        yield cluster
