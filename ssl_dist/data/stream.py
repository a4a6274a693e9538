"""Stream WebDataset shards to one rank: urls -> rank split -> loader-worker split -> tar ->
decode -> fixed-size uint8 batches. The manifest and the split's shard list come from
:mod:`ssl_dist.data.shardset` (``open_shards``, re-exported here).

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

Damaged data (``DataConfig.on_damage``): before an epoch the rank compares its shards' sizes
(and with ``verify_checksums`` their sha256) with the manifest. While reading, each shard's
samples are counted: what a shard falls short of its manifest count is *lost*; a sample that
does not decode is *skipped*; samples a rank reads again to make up its batch count are *top-up
repeats*. ``StreamStats`` holds the counts and a report per damaged shard; a shard problem fails
the stream under ``on_damage.shard=fail`` (before the first batch when the check before the
epoch finds it), a sample problem under ``on_damage.sample=fail``.

Loader workers start with ``forkserver`` or ``spawn``, never fork: a forked worker inside a Ray
worker that already holds threads can deadlock in CPython's after-fork code.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_dist.config import ConfigError, DataConfig
from ssl_dist.data.crops import CropPlan
from ssl_dist.data.damage import ShardReport, StreamStats
from ssl_dist.data.reader import ShardReader, _message
from ssl_dist.data.reader import UnsafeDataError as UnsafeDataError
from ssl_dist.data.shardset import ShardSet as ShardSet
from ssl_dist.data.shardset import open_shards as open_shards

log = logging.getLogger(__name__)


class DamagedDataError(RuntimeError):
    """A shard or sample is damaged and ``data.on_damage`` says to fail."""


class StreamTimeout(RuntimeError):
    """No batch arrived from the loader workers in time."""


@dataclass
class Batch:
    images: torch.Tensor | None
    """uint8 [B, C, H, W]: the evaluation views (short-side resize + centre crop); None in a
    training stream that cuts crops (``crop_scale``): it decodes only what the step uses."""
    labels: torch.Tensor
    """int64 [B]."""
    crops: torch.Tensor | None = None
    """uint8 [B, 2, C, H, W]: the two training views' random-resized crops, cut by the loader
    from the full-resolution images (streams with ``crop_scale``), else None."""
    local_crops: torch.Tensor | None = None
    """uint8 [B, M, C, h, w]: the M local crops of multi-crop methods, cut by the loader from the
    same decode (a ``crop_scale`` that is a :class:`CropPlan` with local crops), else None."""

    def __len__(self) -> int:
        return len(self.labels)

    def eval_images(self) -> torch.Tensor:
        """`images`, which a stream with ``crop_scale`` does not decode."""
        if self.images is None:
            raise ValueError(
                "this batch holds training crops only (a stream with crop_scale); read the "
                "evaluation views from a stream without it"
            )
        return self.images


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
    crop_scale: tuple[float, float] | CropPlan | None = None
    """The views' crop area range: the loader cuts each sample's two random-resized crops
    (``Batch.crops``) from the full-resolution image (a :class:`CropPlan`: also local ones)."""
    keep: dict[str, frozenset[int]] | None = None
    """Evaluation only: per URL, the positions of the samples to read (a subset of the split);
    shards without an entry are not opened."""
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self) -> None:
        self._index = {url: i for i, url in enumerate(self.shards.urls)}
        b = self.cfg.batch_size
        if self.keep is not None:
            if not self.partial:
                raise ValueError("a subset of samples (keep) is read in evaluation only")
            mine = self.shards.urls[self.rank :: self.world_size]
            self.urls = [u for u in mine if u in self.keep]
            self.num_batches = -(-sum(len(self.keep[u]) for u in self.urls) // b)
        elif self.partial:
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

    def _report(self, url: str) -> ShardReport:
        """The report of the shard at `url` (created on its first damage)."""
        info = self.shards.infos[self._index[url]]
        if info.name not in self.stats.shards:
            self.stats.shards[info.name] = ShardReport(info.name, info.samples)
        return self.stats.shards[info.name]

    def _fail(self, what: str, policy: str) -> DamagedDataError:
        return DamagedDataError(
            f"rank {self.rank}, epoch {self.epoch}: {what}. `ssl-dist data verify DIR` lists "
            f"every problem of a shard set; set data.on_damage.{policy}=skip to train on "
            "without what is lost (it is counted and reported)"
        )

    CHECK_THREADS = 16
    """Shards compared with the manifest at once (HEAD requests for remote shards)."""

    def _check_files(self, urls: list[str]) -> dict[str, str | None]:
        """`ShardSet.check` of each URL, a few at a time on daemon threads: a server that never
        answers fails the check after data.first_batch_timeout_s without an answer."""
        todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        done: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        for url in urls:
            todo.put(url)

        def work() -> None:
            while True:
                try:
                    url = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    checksum = self.cfg.verify_checksums
                    done.put((url, self.shards.check(self._index[url], checksum)))
                except Exception as e:
                    done.put((url, f"cannot be checked: {_message(e)}"))

        for _ in range(min(self.CHECK_THREADS, len(urls))):
            threading.Thread(target=work, daemon=True, name="shard-check").start()
        out: dict[str, str | None] = {}
        while len(out) < len(urls):
            try:
                url, problem = done.get(timeout=self.cfg.first_batch_timeout_s)
            except queue.Empty:
                raise StreamTimeout(
                    f"rank {self.rank}: no answer within {self.cfg.first_batch_timeout_s:.0f}s "
                    "(data.first_batch_timeout_s) while comparing the shards with the manifest; "
                    "check that the shards are reachable"
                ) from None
            out[url] = problem
        return out

    def check(self) -> None:
        """Compare this rank's shards with the manifest (sizes; sha256 with
        data.verify_checksums). Raises DamagedDataError under on_damage.shard=fail."""
        # A command's output (pipe:) has no size to compare.
        urls = [u for u in dict.fromkeys(self.urls) if not u.startswith("pipe:")]
        checked = self._check_files(urls)
        problems = []
        for url in urls:
            if problem := checked[url]:
                report = self._report(url)
                report.problems.append(problem)
                problems.append(f"{report.name}: {problem}")
                log.warning("rank %d: shard %s", self.rank, problems[-1])
        if problems and self.cfg.on_damage.shard == "fail":
            raise self._fail("shards do not match the manifest: " + "; ".join(problems), "shard")

    def _record(self, events: list) -> None:
        """Fold a chunk's events into the per-shard reports; apply the damage policy."""
        policy = self.cfg.on_damage
        for event in events:
            kind, url = event[0], event[1]
            if kind == "skip":
                key, why = event[2], event[3]
                report = self._report(url)
                if key in report.skipped:
                    continue  # read again in a top-up pass
                if policy.sample == "fail":
                    raise self._fail(f"sample {key} of shard {report.name}: {why}", "sample")
                report.skipped.add(key)
                log.warning(
                    "rank %d: skipping sample %s of %s: %s", self.rank, key, report.name, why
                )
                continue
            found, error = event[2], event[3]
            info = self.shards.infos[self._index[url]]
            damaged = error is not None or found < info.samples
            if not damaged and info.name not in self.stats.shards:
                continue
            report = self._report(url)
            if report.read is not None:
                continue  # read again in a top-up pass: counted once
            report.read = found
            if not damaged:
                continue
            if error is not None and "missing" not in report.problems:
                report.problems.append(f"reading broke off: {error}")
            if policy.shard == "fail":
                raise self._fail(f"shard {report.line()}", "shard")
            log.warning("rank %d: shard %s", self.rank, report.line())

    def _loader(self, salt: int) -> DataLoader:
        m = self.shards.manifest
        reader = ShardReader(
            self.urls,
            mode="exact" if self.partial else self.cfg.mode,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            image_size=self.cfg.image_size,
            channels=m.channels,
            shuffle_buffer=0 if self.partial else self.cfg.shuffle_buffer,
            allow_unsafe=self.cfg.allow_unsafe,
            chunk=min(self.cfg.batch_size, 64),
            salt=salt,
            keep=self.keep,
            crop_scale=self.crop_scale,
        )
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

    def _chunks(self) -> Iterator[tuple[list[torch.Tensor], bool]]:
        """Chunks ``([labels, views], repeated)`` from the loader (views: the crops with
        ``crop_scale``, else the evaluation views); in exact mode a short
        pass (after lost or skipped samples) is topped up by another pass over this rank's shards,
        so the batch count never falls short; its samples come with ``repeated=True``."""
        for salt in count():
            if salt > 0:
                if self.partial or salt > 3:
                    return
                self.stats.topups += 1
                log.warning(
                    "rank %d: shards ran short (%d samples lost, %d skipped); topping up",
                    self.rank,
                    self.stats.lost,
                    self.stats.skipped,
                )
            got = 0
            try:
                for views, labels, events in self._loader(salt):
                    self._record(events)
                    got += len(labels)
                    if len(labels):  # views: a tensor, or [global crops, local crops]
                        yield [labels, *(views if isinstance(views, list) else [views])], salt > 0
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

    def _batch(self, parts: list[torch.Tensor]) -> Batch:
        labels, views, *local = parts
        if self.crop_scale is None:
            return Batch(views, labels)
        return Batch(None, labels, views, local[0] if local else None)

    def __iter__(self) -> Iterator[Batch]:
        self.check()
        start = time.perf_counter()
        b = self.cfg.batch_size
        # Per pending chunk: [labels, views, repeated]; cut into exact batches.
        pending: list[list[torch.Tensor]] = []
        have = 0
        for parts, repeated in self._chunks():
            pending.append([*parts, torch.full((len(parts[0]),), repeated)])
            have += len(parts[0])
            while have >= b and self.stats.batches < self.num_batches:
                joined = [torch.cat(column) for column in zip(*pending, strict=True)]
                pending, have = [[t[b:] for t in joined]], have - b
                self.stats.batches += 1
                self.stats.samples += b
                self.stats.repeats += int(joined[-1][:b].sum())
                self.stats.seconds = time.perf_counter() - start
                yield self._batch([t[:b] for t in joined[:-1]])
            if self.stats.batches >= self.num_batches:
                break
        if self.partial and have:
            self.stats.batches += 1
            self.stats.samples += have
            joined = [torch.cat(column) for column in zip(*pending, strict=True)]
            yield self._batch(joined[:-1])
        self.stats.seconds = time.perf_counter() - start
        if self.stats.shards or self.stats.repeats:
            log.warning(
                "rank %d epoch %d: %d samples lost, %d skipped, %d top-up repeats",
                self.rank,
                self.epoch,
                self.stats.lost,
                self.stats.skipped,
                self.stats.repeats,
            )
        if not self.partial and self.stats.batches < self.num_batches:
            raise DamagedDataError(
                f"rank {self.rank}: only {self.stats.batches} of {self.num_batches} batches "
                f"could be read ({self.stats.lost} samples lost, {self.stats.skipped} skipped); "
                "the shards are damaged: " + "; ".join(self.stats.report())
            )


def stream(
    cfg: DataConfig,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int = 0,
    split: str | None = None,
    partial: bool = False,
    shards: ShardSet | None = None,
    keep: dict[str, frozenset[int]] | None = None,
    crop_scale: tuple[float, float] | CropPlan | None = None,
) -> Stream:
    """Batches of one epoch for one rank. `partial=True` reads every sample once (evaluation),
    or with `keep` only the samples it names (see `Stream.keep`). With `crop_scale` (the run's
    ``views.crop_scale``) each batch carries the two training crops (``Batch.crops``), and
    with a :class:`CropPlan` the local ones (``Batch.local_crops``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    shards = shards or open_shards(cfg, split)
    return Stream(cfg, shards, rank, world_size, epoch, seed, partial, crop_scale, keep)
