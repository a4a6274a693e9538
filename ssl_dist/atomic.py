"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every file this package writes for others to read (shards, manifests, checkpoints, encoder
artifacts, results) goes through here: the bytes go to a hidden temporary file in the same
folder (``.<name>.<random>.tmp``), are flushed to disk, and the file is renamed over the target
(``os.replace`` is atomic within one filesystem). A failed write leaves no temporary file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_GLOB = ".*.tmp"
"""Matches the temporary files of writes that were cut short (a killed process)."""


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends
    without an exception (after an fsync), removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_file(path) as tmp:
        tmp.write_bytes(payload)
