"""The MLflow run of a logical training run: found by its key (``ssl_dist.run_key`` =
``<storage_path>/<run.name>``) or created, with the flattened config as params (write-once; changes
at a resume recorded in a tag) and lineage tags (versions, git, data manifest digest)."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

from ssl_dist.config import flatten
from ssl_dist.data.shards import manifest_sha256
from ssl_dist.tracking.client import RUN_KEY_TAG, bounded, client, experiment_id, resolve_uri


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
    root = Path(__file__).resolve().parents[2]  # ssl_dist/tracking/run.py -> the checkout
    if not (root / ".git").exists():
        return {}
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.sha": sha, "git.dirty": str(bool(dirty)).lower()}


def log_params(mlflow_client, run, params: dict[str, str]) -> None:
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
    log_params(c, run, {k: str(v) for k, v in flatten(cfg).items()})
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
