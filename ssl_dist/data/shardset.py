"""The shard set of one split: the manifest (local path, file://, http(s)://, s3://), the
split's shard URLs and counts, and the check of each shard file against the manifest.
``pipe:`` URLs only with ``data.allow_unsafe``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import fsspec

from ssl_dist.config import ConfigError, DataConfig
from ssl_dist.data.reader import UnsafeDataError
from ssl_dist.data.shards import MANIFEST, Manifest, ShardInfo, check_file, parse_manifest


@dataclass
class ShardSet:
    manifest: Manifest
    urls: list[str]
    counts: list[int]
    allow_unsafe: bool = False
    infos: list[ShardInfo] = field(default_factory=list)
    """The manifest's entry of each URL (same order)."""
    verified: set[str] = field(default_factory=set)
    """URLs whose sha256 matched the manifest in this process (not hashed again)."""

    def check(self, i: int, checksum: bool) -> str | None:
        """What is wrong with shard `i`'s file against the manifest, or None (see check_file)."""
        url = self.urls[i]
        problem = check_file(url, self.infos[i], checksum and url not in self.verified)
        if problem is None and checksum:
            self.verified.add(url)
        return problem


def _check_url(url: str, allow_unsafe: bool) -> None:
    if url.startswith("pipe:"):
        if not allow_unsafe:
            raise UnsafeDataError(
                f"refusing shard URL {url!r}: `pipe:` runs a shell command; "
                "set data.allow_unsafe=true only for sources you control"
            )
        warnings.warn(f"data.allow_unsafe: running shell pipe {url!r}", stacklevel=2)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def open_shards(cfg: DataConfig, split: str | None = None) -> ShardSet:
    """Read the manifest (local path, file://, http(s)://, s3://) and list the split's shards."""
    url = cfg.manifest
    _check_url(url, cfg.allow_unsafe)
    if not url.endswith(".json"):
        url = _join(url, MANIFEST)
    try:
        with fsspec.open(url, "rt") as f:
            manifest = parse_manifest(f.read(), url)
    except FileNotFoundError:
        raise ConfigError(f"data.manifest {url!r} does not exist") from None
    split = split or cfg.split
    info = manifest.split(split)
    names = [s.name for s in info.shards]
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    if cfg.shards is None:
        urls = [_join(base, n) for n in names]
    else:
        urls = list(cfg.shards)
        got = [u.rstrip("/").rsplit("/", 1)[-1] for u in urls]
        if got != names:
            raise ConfigError(
                f"data.shards does not match the manifest's {split!r} shards: expected "
                f"{len(names)} URLs ending in {names[:3]}..., got {len(urls)}: {got[:3]}..."
            )
    for u in urls:
        _check_url(u, cfg.allow_unsafe)
    counts = [s.samples for s in info.shards]
    return ShardSet(manifest, urls, counts, cfg.allow_unsafe, infos=list(info.shards))
