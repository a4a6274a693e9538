"""Reading this rank's shards in DataLoader workers: each worker takes its share of the shards,
opens each tar (fsspec; ``pipe:`` only when allowed), decodes the images and yields chunks with
the events the stream counts (undecodable samples, samples each finished shard held, where a
shard broke off). Kept apart from :mod:`ssl_dist.data.stream`, which plans the split, checks the
shards against the manifest and re-batches the chunks into exact batches."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from itertools import count

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from ssl_dist.config import ConfigError
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

    Yields chunks ``(images uint8 [k,C,H,W], labels int64 [k], events)`` of up to `chunk`
    samples, `events` saying which samples did not decode and how many samples each finished
    shard held; the main process re-batches them into exact batches and keeps the counts.
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
    ):
        super().__init__()
        self.urls, self.mode, self.seed, self.epoch, self.rank = urls, mode, seed, epoch, rank
        self.image_size, self.channels, self.chunk = image_size, channels, chunk
        self.shuffle_buffer, self.allow_unsafe, self.salt = shuffle_buffer, allow_unsafe, salt
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

    def _decode(self, sample: dict) -> tuple[torch.Tensor, int]:
        bad = [k for k in sample if is_unsafe(k)]
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
        # Events since the last chunk: ("skip", url, key, why) and ("end", url, found, error).
        events: list = []
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for sample in self._samples(worker, num_workers, events):
            try:
                image, label = self._decode(sample)
            except UnsafeDataError:
                raise
            except Exception as e:  # a corrupt sample: counted; the policy decides
                events.append(("skip", sample["__url__"], sample["__key__"], _message(e)))
                continue
            images.append(image)
            labels.append(label)
            if len(images) == self.chunk:
                sent, events[:] = list(events), []
                yield torch.stack(images), torch.tensor(labels), sent
                images, labels = [], []
        if images or events:
            stacked = torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)
            yield stacked, torch.tensor(labels, dtype=torch.int64), list(events)
