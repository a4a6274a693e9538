"""Reading this rank's shards in DataLoader workers: each worker takes its share of the shards,
opens each tar (fsspec; ``pipe:`` only when allowed), decodes the images and yields chunks with
the events the stream counts (undecodable samples, samples each finished shard held, where a
shard broke off). Kept apart from :mod:`ssl_dist.data.stream`, which plans the split, checks the
shards against the manifest and re-batches the chunks into exact batches."""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import count

import fsspec
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from ssl_dist.config import ConfigError
from ssl_dist.data.crops import CropPlan, decode_crops, decode_multi_crops, decode_views, sample_rng
from ssl_dist.data.shards import (
    IMAGE_EXTS,
    is_unsafe,
)


class UnsafeDataError(ConfigError):
    """A shard URL or sample would run or unpickle untrusted content."""


def _open(url: str):
    if url.startswith("pipe:"):
        return gopen(url)
    return fsspec.open(url, "rb").open()


def _message(exn: BaseException) -> str:
    """An exception in one line, without the stream object webdataset appends to it."""
    first = exn.args[0] if exn.args else ""
    text = first if isinstance(first, str) else str(exn)
    return f"{type(exn).__name__}: {text.split(' @ ', 1)[0]}".rstrip(": ")


def decode_image(payload: bytes, size: int, channels: int) -> torch.Tensor:
    """PNG/JPEG/WebP bytes -> uint8 [C, size, size]: the evaluation view (short side resized to
    `size`, centre crop; see :mod:`ssl_dist.data.crops`)."""
    return decode_views(payload, size, channels)


class ShardReader(IterableDataset):
    """Per-rank reader; each DataLoader worker takes its share of this rank's shards.

    Yields chunks ``(views, labels int64 [k], events)`` of up to `chunk` samples, `events`
    saying which samples did not decode and how many samples each finished shard held; the main
    process re-batches them into exact batches and keeps the counts. `views` are the evaluation
    views (uint8 ``[k, C, H, W]``); with `crop_scale` instead the two training views'
    random-resized crops (uint8 ``[k, 2, C, H, W]``), cut from one decode of the
    full-resolution image with a generator of (seed, epoch, key): a training step does not use
    the evaluation view, so it is not decoded. A :class:`~ssl_dist.data.crops.CropPlan` with
    local crops in place of `crop_scale` makes `views` a list: the global crops and the local
    ones (uint8 ``[k, M, C, h, w]``).
    """

    def __init__(
        self,
        urls,
        *,
        mode,
        seed,
        epoch,
        rank,
        image_size,
        channels,
        shuffle_buffer,
        allow_unsafe,
        chunk,
        salt=0,
        keep=None,
        crop_scale=None,
    ):
        super().__init__()
        self.urls, self.mode, self.seed, self.epoch, self.rank = urls, mode, seed, epoch, rank
        self.image_size, self.channels, self.chunk = image_size, channels, chunk
        self.shuffle_buffer, self.allow_unsafe, self.salt = shuffle_buffer, allow_unsafe, salt
        self.crop_scale: tuple[float, float] | CropPlan | None = crop_scale
        self.keep: dict[str, frozenset[int]] | None = keep
        """When given: per URL, the positions (0-based, in shard order) of the only samples to
        decode and yield; the others are read past undecoded."""

    def _worker_urls(self, worker: int, num_workers: int) -> Iterator[str]:
        if self.mode == "exact":
            return iter(self.urls[worker::num_workers])
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{self.salt}")
        return (rng.choice(self.urls) for _ in count())

    def _shard(self, url: str, events: list) -> Iterator[dict]:
        """The samples of one shard (only the kept ones with `keep`), then an
        ``("end", url, found, error)`` event: how many samples were found and, if reading broke
        off, why. Nothing is sent for a shard left unfinished (the epoch had its batches)."""
        found, error = 0, None
        keep = None if self.keep is None else self.keep.get(url, frozenset())
        try:
            stream = _open(url)
            try:
                files = tar_file_expander([{"url": url, "stream": stream}])
                for sample in group_by_keys(files):
                    found += 1
                    if keep is None or found - 1 in keep:
                        yield sample
            finally:
                stream.close()
        except Exception as e:  # missing, unreachable or cut short: counted, the policy decides
            error = _message(e)
        events.append(("end", url, found, error))

    def _samples(self, worker: int, num_workers: int, events: list) -> Iterator[dict]:
        urls = self._worker_urls(worker, num_workers)
        samples = (s for url in urls for s in self._shard(url, events))
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

    def _decode(self, sample: dict) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], int]:
        bad = [k for k in sample if is_unsafe(k)]
        if bad and not self.allow_unsafe:
            raise UnsafeDataError(
                f"sample {sample['__key__']} in {sample['__url__']} carries {bad}: pickle "
                "payloads are refused; set data.allow_unsafe=true only for data you wrote"
            )
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            raise ValueError(f"sample {sample['__key__']} has no image or no cls")
        label = int(sample["cls"])
        if self.crop_scale is None:
            return decode_views(sample[ext], self.image_size, self.channels), label
        shard = sample["__url__"].rsplit("/", 1)[-1]  # the same from a mirror
        rng = sample_rng(self.seed, self.epoch, f"{shard}/{sample['__key__']}")
        plan = self.crop_scale
        if isinstance(plan, CropPlan) and plan.local_count:
            pair = decode_multi_crops(sample[ext], self.image_size, self.channels, rng, plan)
            return pair, label
        scale = plan.scale if isinstance(plan, CropPlan) else plan
        return decode_crops(sample[ext], self.image_size, self.channels, rng, scale), label

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Events since the last chunk: ("skip", url, key, why) and ("end", url, found, error).
        events: list = []
        views: list = []
        labels: list[int] = []

        def stack(items: list) -> torch.Tensor | list[torch.Tensor]:
            if items and isinstance(items[0], tuple):  # [global crops, local crops]
                return [torch.stack(part) for part in zip(*items, strict=True)]
            return torch.stack(items) if items else torch.empty(0, dtype=torch.uint8)

        def chunk() -> tuple:
            sent, events[:] = list(events), []
            return stack(views), torch.tensor(labels, dtype=torch.int64), sent

        for sample in self._samples(worker, num_workers, events):
            try:
                decoded, label = self._decode(sample)
            except UnsafeDataError:
                raise
            except Exception as e:  # a corrupt sample: counted; the policy decides
                events.append(("skip", sample["__url__"], sample["__key__"], _message(e)))
                continue
            views.append(decoded)
            labels.append(label)
            if len(views) == self.chunk:
                yield chunk()
                views, labels = [], []
        if views or events:
            yield chunk()
