"""`ssl-dist retrain`: the scheduled champion / challenger job.

One run of it:

1. takes the lock (:mod:`ssl_dist.retrain_lock`), so that two overlapping schedules never train
   at once;
2. finds the newest shard manifest (`retrain.data`: a path or a glob);
3. warm-starts from the registry's champion encoder (`retrain.warm_start`), or from scratch;
4. pretrains the challenger (`ssl-dist pretrain`, registered with `retrain.challenger_alias`);
5. probes the challenger and the champion with the same linear probe on the fixed evaluation
   shards (`retrain.eval_data`);
6. moves `retrain.champion_alias` to the challenger only if it wins by `retrain.margin`, and
   tags the decision and both scores on both model versions.

It trains nothing (decision ``skipped``) when the champion was itself trained by this job on the
same manifest and config (the schedule fired before new data landed).

The training run's name is derived from the manifest's sha256 (of the file's bytes,
:func:`ssl_dist.data.shards.manifest_sha256`), the config and the champion it
starts from: running again after a crash continues the same Ray run (and MLflow run) from its
last checkpoint, and running again once a job has decided is a no-op that says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec

from ssl_dist import tracking
from ssl_dist.config import Config, ConfigError, flatten
from ssl_dist.data.shards import manifest_sha256
from ssl_dist.evaluate.probe import linear_probe
from ssl_dist.evaluate.source import load_source
from ssl_dist.retrain_lock import RetrainLock
from ssl_dist.train.driver import pretrain, resolve_paths

DECISION_TAG = "ssl_dist.retrain_decision"
DATA_KEY_TAG = "ssl_dist.retrain_data_key"
"""Digest of the manifest and the config a version was trained from (not its starting point)."""


# ------------------------------------------------------------------------------------ the job


def newest_manifest(pattern: str) -> str:
    """`pattern` itself, or the newest (by modification time, then name) file it globs."""
    if not any(c in pattern for c in "*?["):
        return pattern
    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    if not paths:
        raise ConfigError(f"retrain.data: no manifest matches {pattern!r}")

    def mtime(p: str) -> float:
        info = fs.info(p)
        m = info.get("mtime") or info.get("LastModified") or info.get("updated") or 0
        return m.timestamp() if hasattr(m, "timestamp") else float(m)

    newest = max(paths, key=lambda p: (mtime(p), p))
    return newest if "://" not in pattern else fs.unstrip_protocol(newest)


@dataclass
class RetrainResult:
    decision: str
    """promoted | kept | skipped."""
    reason: str
    manifest: str
    run_name: str
    challenger_version: str | None = None
    champion_version: str | None = None
    """The champion the challenger was compared with (None: there was none)."""
    challenger_top1: float | None = None
    champion_top1: float | None = None
    lock_taken_over: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def run_key(cfg: Config, manifest_sha: str, champion: str | None) -> str:
    """A name for the training run: the same data, config and starting point give the same
    name (so a crashed job continues), anything else a new one."""
    skip = ("run.name", "data.manifest", "retrain.", "tracking.")
    keep = {k: v for k, v in flatten(cfg).items() if not k.startswith(skip)}
    digest = hashlib.sha256(
        json.dumps([keep, manifest_sha, champion], sort_keys=True, default=str).encode()
    ).hexdigest()
    return f"retrain-{manifest_sha[:8]}-{digest[:8]}"


def retrain(cfg: Config, log=print) -> RetrainResult:
    """The whole scheduled job (see the module doc). `log` prints progress lines."""
    if not cfg.tracking.enabled:
        raise ConfigError("retrain needs the model registry: tracking.enabled must be true")
    if not cfg.retrain.eval_data:
        raise ConfigError(
            "retrain.eval_data is required: the fixed shards both encoders are probed on"
        )
    cfg = cfg.model_copy(deep=True)
    cfg.data.manifest = newest_manifest(cfg.retrain.data or cfg.data.manifest)
    cfg = resolve_paths(cfg)
    uri = cfg.tracking.uri or ""
    name = cfg.tracking.model_name
    lock_dir = cfg.retrain.lock_dir or str(Path(cfg.run.storage_path) / "locks")
    if "://" in lock_dir:
        raise ConfigError(
            f"the retrain lock needs a local or shared filesystem (it is created with link and "
            f"rename), not {lock_dir}: set retrain.lock_dir (run.storage_path may stay on object "
            "storage)"
        )
    lock = RetrainLock(
        Path(lock_dir) / f"retrain-{name}.lock", cfg.retrain.lock_ttl_s, owner=f"model {name}"
    )
    taken_over = lock.acquire()
    if taken_over:
        log(f"took over a stale lock: {taken_over}")
    try:
        result = _retrain_locked(cfg, uri, name, log)
        result.lock_taken_over = taken_over
        return result
    finally:
        lock.release()


def _retrain_locked(cfg: Config, uri: str, name: str, log) -> RetrainResult:
    c = tracking.client(uri)
    manifest = cfg.data.manifest
    try:
        sha = manifest_sha256(manifest)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the manifest {manifest}: {e}") from None
    champion = _version_by_alias(c, name, cfg.retrain.champion_alias)
    start_from = champion.version if champion is not None and cfg.retrain.warm_start else None
    run_name = run_key(cfg, sha, start_from)
    log(f"newest data: {manifest} (sha256 {sha[:12]})")
    log(
        f"champion: {_describe(champion, name)}; challenger run: {run_name} "
        f"({'warm start from version ' + str(start_from) if start_from else 'from scratch'})"
    )

    # Data and config alone (not the starting point): a schedule that fires again before new
    # data lands must not retrain the champion on what made it.
    data_key = run_key(cfg, sha, None)
    if champion is not None and champion.tags.get(DATA_KEY_TAG) == data_key:
        reason = (
            f"the champion (version {champion.version}) was trained on this data "
            f"(sha256 {sha[:12]}) with this config: nothing new to train"
        )
        log(f"skipped: {reason}")
        return RetrainResult("skipped", reason, manifest, run_name, None, champion.version)

    done = _decided(c, name, run_name)
    if done is not None:
        reason = (
            f"{run_name} was already decided ({done.tags[DECISION_TAG]}, version "
            f"{done.version}): nothing new to train"
        )
        log(reason)
        return RetrainResult(
            "skipped",
            reason,
            manifest,
            run_name,
            done.version,
            champion.version if champion else None,
        )

    cfg.run.name = run_name
    cfg.tracking.alias = cfg.retrain.challenger_alias
    if start_from:
        cfg.model.init_from = f"models:/{name}/{start_from}"
    _, metrics = pretrain(cfg)
    logged = metrics.get("mlflow") or {}
    if "version" not in logged:
        raise RuntimeError(
            "the challenger was trained but could not be registered in MLflow "
            f"at {uri}; run retrain again once the server answers"
        )
    challenger = c.get_model_version(name, logged["version"])

    eval_data = cfg.retrain.eval_data or ""
    challenger_top1 = _probe(f"models:/{name}/{challenger.version}", eval_data, uri)
    champion_top1 = (
        _probe(f"models:/{name}/{champion.version}", eval_data, uri) if champion else None
    )
    margin = cfg.retrain.margin
    if champion is None:
        decision, reason = "promoted", "there was no champion yet"
    elif challenger_top1 >= (champion_top1 or 0.0) + margin:
        decision, reason = (
            "promoted",
            (
                f"challenger top-1 {challenger_top1:.2%} >= champion "
                f"{champion_top1:.2%} + margin {margin:.2%}"
            ),
        )
    else:
        decision, reason = (
            "kept",
            (
                f"challenger top-1 {challenger_top1:.2%} < champion "
                f"{champion_top1:.2%} + margin {margin:.2%}"
            ),
        )

    tags = {
        "ssl_dist.retrain_challenger_top1": f"{challenger_top1:.6f}",
        "ssl_dist.retrain_champion_top1": "none"
        if champion_top1 is None
        else f"{champion_top1:.6f}",
        "ssl_dist.retrain_margin": str(margin),
        "ssl_dist.retrain_eval_data": eval_data,
        "ssl_dist.retrain_run": cfg.run.name,
        "ssl_dist.retrain_manifest_sha256": sha,
        DATA_KEY_TAG: data_key,
        "ssl_dist.retrain_compared_with": champion.version if champion else "none",
        "ssl_dist.retrain_reason": reason,
    }
    for k, v in {**tags, DECISION_TAG: decision}.items():
        c.set_model_version_tag(name, challenger.version, k, v)
    if champion is not None:
        c.set_model_version_tag(
            name,
            champion.version,
            f"ssl_dist.challenged_by_v{challenger.version}",
            f"{decision}: {reason}",
        )
    if decision == "promoted":
        c.set_registered_model_alias(name, cfg.retrain.champion_alias, challenger.version)
    log(f"{decision}: {reason}")
    return RetrainResult(
        decision,
        reason,
        manifest,
        run_name,
        challenger.version,
        champion.version if champion else None,
        challenger_top1,
        champion_top1,
    )


def _probe(model_uri: str, eval_data: str, uri: str) -> float:
    return float(linear_probe(load_source(model_uri, tracking_uri=uri), eval_data)["top1"])


def _version_by_alias(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException  # heavy (mlflow): deferred to its first use

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        # No such model or alias: there is no champion. Anything else (the server failing)
        # must not pass for "no champion", which would promote the challenger unopposed.
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _decided(c, name: str, run_name: str):
    """The model version a previous job registered and decided for `run_name`, if any."""
    from mlflow.exceptions import MlflowException  # heavy (mlflow): deferred to its first use

    try:
        found = c.search_model_versions(
            f"name = '{name}' and tags.`ssl_dist.retrain_run` = '{run_name}'"
        )
    except MlflowException:
        return None
    decided = [v for v in found if DECISION_TAG in v.tags]
    return max(decided, key=lambda v: int(v.version)) if decided else None


def _describe(version, name: str) -> str:
    if version is None:
        return "none yet"
    score = version.tags.get("ssl_dist.retrain_challenger_top1")
    return f"{name} version {version.version}" + (
        f" (probe top-1 {float(score):.2%})" if score else ""
    )
