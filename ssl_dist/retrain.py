"""`ssl-dist retrain`: the scheduled champion / challenger job.

One run of it:

1. takes the lock, so that two overlapping schedules never train at once;
2. finds the newest shard manifest (`retrain.data`: a path or a glob);
3. warm-starts from the registry's champion encoder (`retrain.warm_start`), or from scratch;
4. pretrains the challenger (`ssl-dist pretrain`, registered with `retrain.challenger_alias`);
5. probes the challenger and the champion with the same linear probe on the fixed evaluation
   shards (`retrain.eval_data`);
6. moves `retrain.champion_alias` to the challenger only if it wins by `retrain.margin`, and
   tags the decision and both scores on both model versions.

It trains nothing (decision ``skipped``) when the champion was itself trained by this job on the
same manifest and config (the schedule fired before new data landed).

The training run's name is derived from the manifest's sha256, the config and the champion it
starts from: running again after a crash continues the same Ray run (and MLflow run) from its
last checkpoint, and running again once a job has decided is a no-op that says so.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ssl_dist.config import Config, ConfigError, flatten


class LockHeld(RuntimeError):
    """Another retrain job holds the lock (CLI exit code 3)."""


DECISION_TAG = "ssl_dist.retrain_decision"
DATA_KEY_TAG = "ssl_dist.retrain_data_key"
"""Digest of the manifest and the config a version was trained from (not its starting point)."""


# ------------------------------------------------------------------------------------ the lock


class RetrainLock:
    """An exclusive lock file that only one job can hold, even while several take over a stale one.

    The file records host, pid, start time, owner and a random nonce, so that every lock ever
    written has distinct content. It is stale when older than `ttl_s`, or held by a process of
    this host that no longer exists (a crashed job); a stale lock is taken over.

    Why this is safe with many contenders, on a local disk and on NFS (v3 or later): it relies
    only on link(2), rename(2) and O_EXCL create, which the file server performs atomically, and
    on close-to-open consistency (a file read after its writer closed it is complete); it needs
    no lock manager and no synchronised clocks beyond the TTL.

    - A lock is created complete: written to a unique temporary file, then hard-linked to the
      lock's name; link(2) fails when the name exists. Nobody ever reads a half-written lock
      (which would look stale). A link whose reply was lost counts by the temporary file's link
      count, as open(2) recommends for NFS.
    - Every lock instance (its exact bytes) changes hands once: whoever replaces or removes it
      must first create its claim file ``<lock>.claim.<sha256 of the bytes>`` exclusively. So of
      all the jobs that judged the same lock stale, one creates the claim and atomically renames
      its own lock over the stale one; the others get LockHeld. `release()` claims its own
      instance before removing it, so a holder that was taken over (past the TTL) never removes
      its successor's lock.

    Not chosen: renaming the stale file aside and checking what was moved lets a slow contender
    move a fresh lock aside, and a third job create one in the gap (two holders). flock/fcntl
    locks exclude across hosts only where the mount has a working lock manager (not with NFS
    ``nolock`` or most FUSE filesystems), and cannot express the TTL takeover of a hung holder.

    Claim files and temporary files left by crashes are pruned after `KEEP_S` (a contender
    would have to pause that long between two file operations to be misled by a pruned claim).
    """

    KEEP_S = 7 * 86400

    def __init__(self, path: Path, ttl_s: float, owner: str) -> None:
        self.path, self.ttl_s, self.owner = path, ttl_s, owner
        self.held = False
        self._content = b""

    def _new_content(self) -> bytes:
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "owner": self.owner,
            "nonce": secrets.token_hex(8),
        }
        return json.dumps(info).encode()

    def _stale(self, info: dict[str, Any]) -> str | None:
        age = time.time() - float(info.get("started", 0))
        if age > self.ttl_s:
            return f"older than retrain.lock_ttl_s ({age:.0f}s)"
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info.get("pid", -1)), 0)
            except ProcessLookupError:
                return f"its process {info.get('pid')} is gone"
            except PermissionError:
                return None
        return None

    def _sibling(self, kind: str, tag: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{kind}.{tag}")

    def _write_temp(self, content: bytes) -> Path:
        """A unique, complete file beside the lock, to be linked or renamed into place."""
        tmp = self._sibling("tmp", f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        return tmp

    def _create(self, path: Path, content: bytes) -> bool:
        """Create `path` with `content` unless it exists (link(2), NFS-safe); True if we did."""
        tmp = self._write_temp(content)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return os.stat(tmp).st_nlink == 2  # the link was made but its reply was lost
        finally:
            tmp.unlink(missing_ok=True)

    def _claim(self, content: bytes) -> bool:
        """The one right to replace or remove the lock instance `content`."""
        digest = hashlib.sha256(content).hexdigest()[:32]
        return self._create(self._sibling("claim", digest), self._new_content())

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _stale_or_held(self, content: bytes) -> str:
        """Why the lock `content` is stale; LockHeld naming its holder when it is not."""
        try:
            info = json.loads(content or b"{}")
        except ValueError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        why = self._stale(info)
        if why is not None:
            return why
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
        raise LockHeld(
            f"another retrain holds {self.path} (host {info.get('host')}, pid "
            f"{info.get('pid')}, since {since}, {info.get('owner')}); not starting"
        )

    def _take_over(self, stale: bytes) -> None:
        """Replace the lock instance `stale` with ours, if we are the one to claim it."""
        # Re-read after the claim: only a claim pruned after KEEP_S could let it have changed.
        if not self._claim(stale) or self._read() != stale:
            raise LockHeld(f"could not take {self.path}: another job took it over meanwhile")
        os.replace(self._write_temp(self._content), self.path)

    def acquire(self) -> str | None:
        """Take the lock; returns why a stale lock was taken over (else None). LockHeld when
        another job holds it or won the takeover."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._content = self._new_content()
        for _ in range(3):
            if self._create(self.path, self._content):
                self.held = True
                return None
            current = self._read()
            if current is None:  # released meanwhile: try to create it again
                continue
            why = self._stale_or_held(current)
            self._take_over(current)
            self.held = True
            return why
        raise LockHeld(f"could not take {self.path}: it kept changing hands")

    def release(self) -> None:
        """Remove the lock if it is still ours; a lock taken over from us stays."""
        if not self.held:
            return
        self.held = False
        if self._claim(self._content) and self._read() == self._content:
            self.path.unlink(missing_ok=True)
        self._prune()

    def _prune(self) -> None:
        """Remove claim and temporary files older than KEEP_S."""
        cutoff = time.time() - self.KEEP_S
        for old in self.path.parent.glob(f"{glob.escape(self.path.name)}.*"):
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < cutoff:
                    old.unlink()

    def __enter__(self) -> RetrainLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------------------------ the job


def newest_manifest(pattern: str) -> str:
    """`pattern` itself, or the newest (by modification time, then name) file it globs."""
    import fsspec

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
    digest = hashlib.sha256(json.dumps([keep, manifest_sha, champion], sort_keys=True,
                                       default=str).encode()).hexdigest()  # fmt: skip
    return f"retrain-{manifest_sha[:8]}-{digest[:8]}"


def retrain(cfg: Config, log=print) -> RetrainResult:
    """The whole scheduled job (see the module doc). `log` prints progress lines."""
    from ssl_dist.train.driver import resolve_paths

    if not cfg.tracking.enabled:
        raise ConfigError("retrain needs the model registry: tracking.enabled must be true")
    if not cfg.retrain.eval_data:
        raise ConfigError("retrain.eval_data is required: the fixed shards both encoders are "
                          "probed on")  # fmt: skip
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
    from ssl_dist import tracking
    from ssl_dist.train.driver import pretrain

    c = tracking.client(uri)
    manifest = cfg.data.manifest
    sha = tracking.manifest_sha256(manifest)
    if sha is None:
        raise ConfigError(f"cannot read the manifest {manifest}")
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
        reason = (f"the champion (version {champion.version}) was trained on this data "
                  f"(sha256 {sha[:12]}) with this config: nothing new to train")  # fmt: skip
        log(f"skipped: {reason}")
        return RetrainResult("skipped", reason, manifest, run_name, None, champion.version)

    done = _decided(c, name, run_name)
    if done is not None:
        reason = (f"{run_name} was already decided ({done.tags[DECISION_TAG]}, version "
                  f"{done.version}): nothing new to train")  # fmt: skip
        log(reason)
        return RetrainResult("skipped", reason, manifest, run_name, done.version,
                             champion.version if champion else None)  # fmt: skip

    cfg.run.name = run_name
    cfg.tracking.alias = cfg.retrain.challenger_alias
    if start_from:
        cfg.model.init_from = f"models:/{name}/{start_from}"
    _, metrics = pretrain(cfg)
    logged = metrics.get("mlflow") or {}
    if "version" not in logged:
        raise RuntimeError("the challenger was trained but could not be registered in MLflow "
                           f"at {uri}; run retrain again once the server answers")  # fmt: skip
    challenger = c.get_model_version(name, logged["version"])

    eval_data = cfg.retrain.eval_data or ""
    challenger_top1 = _probe(f"models:/{name}/{challenger.version}", eval_data, uri)
    champion_top1 = _probe(f"models:/{name}/{champion.version}", eval_data, uri) if champion \
        else None  # fmt: skip
    margin = cfg.retrain.margin
    if champion is None:
        decision, reason = "promoted", "there was no champion yet"
    elif challenger_top1 >= (champion_top1 or 0.0) + margin:
        decision, reason = "promoted", (f"challenger top-1 {challenger_top1:.2%} >= champion "
                                        f"{champion_top1:.2%} + margin {margin:.2%}")  # fmt: skip
    else:
        decision, reason = "kept", (f"challenger top-1 {challenger_top1:.2%} < champion "
                                    f"{champion_top1:.2%} + margin {margin:.2%}")  # fmt: skip

    tags = {"ssl_dist.retrain_challenger_top1": f"{challenger_top1:.6f}",
            "ssl_dist.retrain_champion_top1": "none" if champion_top1 is None
            else f"{champion_top1:.6f}",
            "ssl_dist.retrain_margin": str(margin),
            "ssl_dist.retrain_eval_data": eval_data,
            "ssl_dist.retrain_run": cfg.run.name,
            "ssl_dist.retrain_manifest_sha256": sha,
            DATA_KEY_TAG: data_key,
            "ssl_dist.retrain_compared_with": champion.version if champion else "none",
            "ssl_dist.retrain_reason": reason}  # fmt: skip
    for k, v in {**tags, DECISION_TAG: decision}.items():
        c.set_model_version_tag(name, challenger.version, k, v)
    if champion is not None:
        c.set_model_version_tag(name, champion.version, f"ssl_dist.challenged_by_v"
                                f"{challenger.version}", f"{decision}: {reason}")  # fmt: skip
    if decision == "promoted":
        c.set_registered_model_alias(name, cfg.retrain.champion_alias, challenger.version)
    log(f"{decision}: {reason}")
    return RetrainResult(decision, reason, manifest, run_name, challenger.version,
                         champion.version if champion else None, challenger_top1,
                         champion_top1)  # fmt: skip


def _probe(model_uri: str, eval_data: str, uri: str) -> float:
    from ssl_dist.evaluate.finetune import linear_probe
    from ssl_dist.evaluate.source import load_source

    return float(linear_probe(load_source(model_uri, tracking_uri=uri), eval_data)["top1"])


def _version_by_alias(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

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
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name = '{name}' and tags.`ssl_dist.retrain_run` = "
                                        f"'{run_name}'")  # fmt: skip
    except MlflowException:
        return None
    decided = [v for v in found if DECISION_TAG in v.tags]
    return max(decided, key=lambda v: int(v.version)) if decided else None


def _describe(version, name: str) -> str:
    if version is None:
        return "none yet"
    score = version.tags.get("ssl_dist.retrain_challenger_top1")
    return f"{name} version {version.version}" + (f" (probe top-1 {float(score):.2%})"
                                                   if score else "")  # fmt: skip
