"""Stream WebDataset shards to one rank: urls -> rank split -> loader-worker split -> tar ->
decode -> fixed-size uint8 batches.

Splitting takes an explicit ``(rank, world_size, epoch)``; nothing here reads the environment.

Two modes (``DataConfig.mode``):

* ``exact``: the shard list is permuted with a seed of (run seed, epoch), the same on every rank,
  and dealt round-robin to ranks, then to loader workers. Every sample is read by exactly one
  (rank, worker). Each rank yields ``sum(S // W smallest shard counts) // batch_size`` batches,
  computed from the manifest: every rank holds at least that many samples in every epoch, so
  all ranks run the same number of steps in every epoch and collectives never hang. The
  documented remainder: samples past that count on each rank are dropped for this epoch (a
  different permutation next epoch drops different ones). With equal shards (all but the last
  full) this is at most one shard's worth plus one batch per rank.
* ``resampled``: every (rank, worker) draws shards with replacement from a generator seeded by
  (seed, epoch, rank, worker), and the rank yields a fixed number of batches; for data sets with
  fewer shards than ranks x workers, or too large to count on.

Loader workers start with ``forkserver`` or ``spawn``, never fork: a forked worker inside a Ray
worker that already holds threads can deadlock in CPython's after-fork code.
"""

from __future__ import annotations

import io
import logging
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from ssl_dist.config import ConfigError, DataConfig
from ssl_dist.data.shards import MANIFEST, Manifest, parse_manifest

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm")
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "pyd.gz")
"""Extensions whose decoders would unpickle the payload: refused unless data.allow_unsafe."""


class UnsafeDataError(ConfigError):
    """A shard URL or sample would run or unpickle untrusted content."""


class StreamTimeout(RuntimeError):
    """No batch arrived from the loader workers in time."""


@dataclass
class Batch:
    images: torch.Tensor
    """uint8 [B, C, H, W]."""
    labels: torch.Tensor
    """int64 [B]."""


@dataclass
class StreamStats:
    batches: int = 0
    samples: int = 0
    skipped: int = 0
    """Samples that failed to decode (or whole shards that failed to read, counted once each)."""
    topups: int = 0
    """Extra passes over this rank's shards needed to fill the batch count after skips."""
    seconds: float = 0.0


@dataclass
class ShardSet:
    manifest: Manifest
    urls: list[str]
    counts: list[int]
    allow_unsafe: bool = False


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
    return ShardSet(manifest, urls, [s.samples for s in info.shards], cfg.allow_unsafe)


def plan_exact(
    counts: list[int], rank: int, world_size: int, epoch: int, seed: int, batch_size: int
) -> tuple[list[int], int]:
    """Shards of `rank` for `epoch` (indices into the manifest list) and the batches per rank."""
    if len(counts) < world_size:
        raise ConfigError(
            f"exact mode needs at least one shard per rank: {len(counts)} shards for "
            f"{world_size} ranks; write smaller shards (--samples-per-shard) or set "
            "data.mode=resampled"
        )
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)).tolist()
    per_rank = [order[r::world_size] for r in range(world_size)]
    # Every rank holds at least S // W shards, so its share is at least the sum of the S // W
    # smallest: a batch count that holds for every epoch's permutation.
    floor_share = sum(sorted(counts)[: len(counts) // world_size])
    batches = floor_share // batch_size
    if batches == 0:
        raise ConfigError(
            f"data.batch_size={batch_size} is larger than the samples one rank is sure to get "
            f"({floor_share}); lower it or use fewer ranks"
        )
    return per_rank[rank], batches


class _Counter:
    """Counts read errors; the handler webdataset calls on a bad shard or sample."""

    def __init__(self) -> None:
        self.errors = 0

    def __call__(self, exn: BaseException) -> bool:
        self.errors += 1
        log.warning("skipping unreadable shard data: %s", exn.args[0] if exn.args else exn)
        return True


def _open_urls(urls, allow_unsafe: bool):
    for url in urls:
        if url.startswith("pipe:"):
            from webdataset.gopen import gopen

            stream = gopen(url)
        else:
            stream = fsspec.open(url, "rb").open()
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()


def decode_image(payload: bytes, size: int, channels: int) -> torch.Tensor:
    """PNG/JPEG bytes -> uint8 [C, size, size]."""
    with Image.open(io.BytesIO(payload)) as raw:
        im = raw.convert("L" if channels == 1 else "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ShardReader(IterableDataset):
    """Per-rank reader; each DataLoader worker takes its share of this rank's shards.

    Yields chunks ``(images uint8 [k,C,H,W], labels int64 [k], skipped)`` of up to `chunk`
    samples; the main process re-batches them into exact batches.
    """

    def __init__(self, urls, *, mode, seed, epoch, rank, image_size, channels, shuffle_buffer,
                 allow_unsafe, chunk, salt=0):  # fmt: skip
        super().__init__()
        self.urls, self.mode, self.seed, self.epoch, self.rank = urls, mode, seed, epoch, rank
        self.image_size, self.channels, self.chunk = image_size, channels, chunk
        self.shuffle_buffer, self.allow_unsafe, self.salt = shuffle_buffer, allow_unsafe, salt

    def _worker_urls(self, worker: int, num_workers: int) -> Iterator[str]:
        if self.mode == "exact":
            return iter(self.urls[worker::num_workers])
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{self.salt}")
        return (rng.choice(self.urls) for _ in count())

    def _samples(self, worker: int, num_workers: int, errors: _Counter) -> Iterator[dict]:
        urls = self._worker_urls(worker, num_workers)
        files = tar_file_expander(_open_urls(urls, self.allow_unsafe), handler=errors)
        samples = group_by_keys(files, handler=errors)
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random(f"shuffle/{self.seed}/{self.epoch}/{self.rank}/{worker}/{self.salt}")
        buf: list[dict] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _decode(self, sample: dict) -> tuple[torch.Tensor, int]:
        bad = [k for k in sample if k.endswith(UNSAFE_EXTS)]
        if bad and not self.allow_unsafe:
            raise UnsafeDataError(
                f"sample {sample['__key__']} in {sample['__url__']} carries {bad}: pickle "
                "payloads are refused; set data.allow_unsafe=true only for data you wrote"
            )
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            raise ValueError(f"sample {sample['__key__']} has no image or no cls")
        return decode_image(sample[ext], self.image_size, self.channels), int(sample["cls"])

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        errors = _Counter()
        images: list[torch.Tensor] = []
        labels: list[int] = []
        reported = 0
        for sample in self._samples(worker, num_workers, errors):
            try:
                image, label = self._decode(sample)
            except UnsafeDataError:
                raise
            except Exception as e:  # a corrupt sample is skipped and counted, never fatal
                errors(e)
                continue
            images.append(image)
            labels.append(label)
            if len(images) == self.chunk:
                yield torch.stack(images), torch.tensor(labels), errors.errors - reported
                reported = errors.errors
                images, labels = [], []
        if images or errors.errors > reported:
            stacked = torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)
            yield stacked, torch.tensor(labels, dtype=torch.int64), errors.errors - reported


@dataclass
class Stream:
    """One rank's batches for one epoch; iterate once. ``len()`` is the planned batch count."""

    cfg: DataConfig
    shards: ShardSet
    rank: int
    world_size: int
    epoch: int
    seed: int
    partial: bool = False
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self) -> None:
        b = self.cfg.batch_size
        if self.partial:
            # Evaluation: every sample of this rank's shards once, last batch may be short.
            self.urls = self.shards.urls[self.rank :: self.world_size]
            self.num_batches = -(-sum(self.shards.counts[self.rank :: self.world_size]) // b)
        elif self.cfg.mode == "exact":
            idx, self.num_batches = plan_exact(
                self.shards.counts, self.rank, self.world_size, self.epoch, self.seed, b
            )
            self.urls = [self.shards.urls[i] for i in idx]
        else:
            total = sum(self.shards.counts)
            self.urls = list(self.shards.urls)
            self.num_batches = self.cfg.steps_per_epoch or max(1, total // (b * self.world_size))

    def __len__(self) -> int:
        return self.num_batches

    def _loader(self, salt: int) -> DataLoader:
        m = self.shards.manifest
        reader = ShardReader(
            self.urls, mode="exact" if self.partial else self.cfg.mode, seed=self.seed,
            epoch=self.epoch, rank=self.rank, image_size=self.cfg.image_size,
            channels=m.channels, shuffle_buffer=0 if self.partial else self.cfg.shuffle_buffer,
            allow_unsafe=self.cfg.allow_unsafe, chunk=min(self.cfg.batch_size, 64), salt=salt,
        )  # fmt: skip
        workers = self.cfg.loader_workers
        return DataLoader(
            reader,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context=self.cfg.start_method if workers else None,
            timeout=self.cfg.first_batch_timeout_s if workers else 0,
            persistent_workers=False,
            # Its own generator: creating the loader iterator must not draw from the global
            # RNG, or a resumed run's later random draws (shuffle-BN) would shift.
            generator=torch.Generator().manual_seed(
                hash((self.seed, self.epoch, self.rank, salt)) & 0x7FFF_FFFF
            ),
        )

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks from the loader; in exact mode a short pass (after skips) is topped up by
        another pass over this rank's shards, so the batch count never falls short."""
        for salt in count():
            if salt > 0:
                if self.partial or salt > 3:
                    return
                self.stats.topups += 1
                log.warning("rank %d: shards ran short after %d skipped samples; topping up",
                            self.rank, self.stats.skipped)  # fmt: skip
            got = 0
            try:
                for images, labels, skipped in self._loader(salt):
                    self.stats.skipped += int(skipped)
                    got += len(labels)
                    if len(labels):
                        yield images, labels
            except RuntimeError as e:
                if "timed out" in str(e).lower():
                    raise StreamTimeout(
                        f"rank {self.rank}: no batch from the loader workers within "
                        f"{self.cfg.first_batch_timeout_s:.0f}s (data.first_batch_timeout_s); "
                        "check that the shards are reachable and the workers could start"
                    ) from e
                raise
            if got == 0 and salt > 0:
                return

    def __iter__(self) -> Iterator[Batch]:
        start = time.perf_counter()
        b = self.cfg.batch_size
        pending_x: list[torch.Tensor] = []
        pending_y: list[torch.Tensor] = []
        have = 0
        for images, labels in self._chunks():
            pending_x.append(images)
            pending_y.append(labels)
            have += len(labels)
            while have >= b and self.stats.batches < self.num_batches:
                x, y = torch.cat(pending_x), torch.cat(pending_y)
                pending_x, pending_y, have = [x[b:]], [y[b:]], have - b
                self.stats.batches += 1
                self.stats.samples += b
                self.stats.seconds = time.perf_counter() - start
                yield Batch(x[:b], y[:b])
            if self.stats.batches >= self.num_batches:
                break
        if self.partial and have:
            self.stats.batches += 1
            self.stats.samples += have
            yield Batch(torch.cat(pending_x), torch.cat(pending_y))
        self.stats.seconds = time.perf_counter() - start
        if self.stats.skipped:
            log.warning("rank %d epoch %d: skipped %d unreadable samples",
                        self.rank, self.epoch, self.stats.skipped)  # fmt: skip
        if not self.partial and self.stats.batches < self.num_batches:
            raise RuntimeError(
                f"rank {self.rank}: only {self.stats.batches} of {self.num_batches} batches "
                f"could be read ({self.stats.skipped} samples skipped); the shards are damaged"
            )


def stream(
    cfg: DataConfig, rank: int, world_size: int, epoch: int, seed: int = 0,
    split: str | None = None, partial: bool = False, shards: ShardSet | None = None,
) -> Stream:  # fmt: skip
    """Batches of one epoch for one rank. `partial=True` reads every sample once (evaluation)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    shards = shards or open_shards(cfg, split)
    return Stream(cfg, shards, rank, world_size, epoch, seed, partial)
