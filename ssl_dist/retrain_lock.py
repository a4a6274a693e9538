"""The retrain job's lock: only one scheduled retrain of a model trains at a time, on a local or
shared filesystem (NFS included), with stale locks taken over by exactly one job."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any


class LockHeld(RuntimeError):
    """Another retrain job holds the lock (CLI exit code 3)."""


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
