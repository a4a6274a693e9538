"""The lock (constraints.txt) covers what pyproject.toml asks for, agrees with its pins and with
the Ray version the cluster manifests run, and re-sharding refuses an untested DeepSpeed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from ssl_dist.dist.reshard import RESHARD_TESTED_DEEPSPEED, check_reshard_support

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["cloud"]]


def test_lock_pins_every_requirement_within_its_range():
    lock = _lock()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not in constraints.txt (run make lock)"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"constraints.txt has {req.name}=={lock[name]}, outside pyproject's {req.specifier}"
        )


def test_close_dependencies_are_pinned_to_a_series():
    reqs = {canonicalize_name(r.name): r.specifier for r in _requirements()}
    # Re-sharding reads DeepSpeed internals; elastic runs use Ray Train V2's API.
    assert not reqs["deepspeed"].contains("0.20.0") and reqs["deepspeed"].contains("0.19.9")
    assert not reqs["ray"].contains("2.61.0") and reqs["ray"].contains("2.60.1")
    assert not reqs["mlflow"].contains("4.0.0") and reqs["mlflow"].contains("3.99")
    deepspeed = _lock()["deepspeed"]
    assert f"{deepspeed.major}.{deepspeed.minor}" == RESHARD_TESTED_DEEPSPEED


def test_cluster_manifests_run_the_locked_ray():
    ray = str(_lock()["ray"])
    for path in sorted((ROOT / "cluster" / "k8s").glob("*.yaml")):
        text = path.read_text()
        versions = [v for doc in yaml.safe_load_all(text) for v in _find(doc, "rayVersion")]
        assert all(v == ray for v in versions), (path.name, versions, ray)


def _find(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield str(v)
            yield from _find(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find(v, key)


def test_resharding_refuses_an_untested_deepspeed():
    check_reshard_support(f"{RESHARD_TESTED_DEEPSPEED}.0")
    check_reshard_support(f"{RESHARD_TESTED_DEEPSPEED}.99+cpu")
    major, minor = RESHARD_TESTED_DEEPSPEED.split(".")
    for other in (f"{major}.{int(minor) + 1}.0", f"{major}.{int(minor) - 1}.5", "1.0.0"):
        with pytest.raises(RuntimeError, match="tested on deepspeed"):
            check_reshard_support(other)
