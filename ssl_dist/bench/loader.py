"""`ssl-dist bench loader`: how fast images reach the training step.

One run measures, on the same images:
* the raw tar read rate (bytes/s and samples/s, no decode): the ceiling;
* the shard stream (`ssl_dist.data.stream`) with 1 and 2 loader workers;
* a plain map-style Dataset of individual PNG files through a DataLoader, 1 and 2 workers;
* two-view augmentation: kornia on whole batches vs torchvision v2 one image at a time.
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ssl_dist.bench.report import table, timed, write
from ssl_dist.config import DataConfig, ViewsConfig
from ssl_dist.data.reader import decode_image
from ssl_dist.data.shards import read_manifest, write_shards
from ssl_dist.data.sources import load_source
from ssl_dist.data.stream import stream
from ssl_dist.data.views import TwoViews, per_sample_torchvision_views


class PngFiles(Dataset):
    """The baseline: one PNG file per sample, decoded by the same function as the stream."""

    def __init__(self, root: Path, size: int, channels: int) -> None:
        self.files = sorted(root.glob("*.png"))
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        image = decode_image(path.read_bytes(), self.size, self.channels)
        return image, int(path.stem.rsplit("_", 1)[1])


def _prepare(work: Path, source: str) -> tuple[Path, Path]:
    shards, files = work / "shards", work / "png"
    if not (shards / "manifest.json").is_file():
        src = load_source(source, None)
        write_shards(src, shards, samples_per_shard=500, overwrite=True)
        files.mkdir(parents=True, exist_ok=True)
        for key, image, label in src.splits["train"]:
            Image.fromarray(image).save(files / f"{key}_{label}.png", compress_level=1)
    return shards, files


def _tar_rate(shards: Path, seconds: float) -> dict:

    paths = [shards / s.name for s in read_manifest(shards).splits["train"].shards]
    nbytes = 0

    def once() -> int:
        nonlocal nbytes
        n = 0
        for p in paths:
            with tarfile.open(p) as tar:
                for m in tar:
                    f = tar.extractfile(m)
                    nbytes += len(f.read()) if f else 0
                    n += m.name.endswith(".png")
        return n

    secs, n = timed(once, seconds)
    return {
        "reader": "raw tar read (no decode)",
        "workers": 0,
        "images_s": n / secs,
        "MB_s": nbytes / secs / 1e6,
    }


def _loader_rate(name: str, workers: int, make_iter, seconds: float) -> dict:
    """Steady-state rate: the clock starts at the first batch (worker start-up reported apart)."""
    start = time.perf_counter()
    it = make_iter()
    first = next(it)
    startup = time.perf_counter() - start
    n, t0 = len(first[1]), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for batch in it:
            n += len(batch[1])
        it = make_iter()
    secs = time.perf_counter() - t0
    return {"reader": name, "workers": workers, "images_s": n / secs, "startup_s": startup}


def run(out: Path, work: Path, source: str, image_size: int, batch_size: int, seconds: float):
    torch.set_num_threads(1)
    shards, files = _prepare(work, source)
    manifest = read_manifest(shards)
    rows = [_tar_rate(shards, seconds)]
    for workers in (1, 2):
        cfg = DataConfig(
            manifest=str(shards / "manifest.json"),
            batch_size=batch_size,
            image_size=image_size,
            loader_workers=workers,
        )
        epoch = iter(range(1 << 30))
        rows.append(
            _loader_rate(
                "ssl-dist stream (shards)",
                workers,
                lambda cfg=cfg, epoch=epoch: (
                    (b.images, b.labels) for b in stream(cfg, 0, 1, next(epoch))
                ),
                seconds,
            )
        )
        ds = PngFiles(files, image_size, manifest.channels)
        rows.append(
            _loader_rate(
                "map-style Dataset (PNG files)",
                workers,
                lambda ds=ds, w=workers: iter(
                    DataLoader(
                        ds,
                        batch_size=batch_size,
                        shuffle=True,
                        num_workers=w,
                        drop_last=True,
                        multiprocessing_context="forkserver",
                    )
                ),
                seconds,
            )
        )
    base = {r["workers"]: r["images_s"] for r in rows if r["reader"].startswith("map-style")}
    for r in rows:
        if r["reader"].startswith("ssl-dist"):
            r["vs_map_style"] = r["images_s"] / base[r["workers"]]
        r["vs_raw_tar"] = r["images_s"] / rows[0]["images_s"]
    aug = _views_rates(manifest, image_size, batch_size, seconds)
    print(f"loader bench: {source}, {image_size}px, batch {batch_size}")
    print(
        table(
            rows,
            ["reader", "workers", "images_s", "vs_map_style", "vs_raw_tar", "startup_s", "MB_s"],
        )
    )
    print()
    print(table(aug, ["augmentation", "images_s", "speedup"]))
    write(
        out,
        "loader",
        rows,
        {"augmentation": aug, "source": source, "image_size": image_size, "batch_size": batch_size},
    )
    print(f"\nwrote {out}")


def _views_rates(manifest, image_size: int, batch_size: int, seconds: float) -> list[dict]:

    cfg = ViewsConfig(blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
    rng = np.random.default_rng(0)
    c = manifest.channels
    batch = torch.from_numpy(
        rng.integers(0, 256, (batch_size, c, image_size, image_size), dtype=np.uint8)
    )
    views = TwoViews(cfg, image_size, 3, manifest.mean, manifest.std)
    mean, std = list(manifest.mean) * (3 // c), list(manifest.std) * (3 // c)
    k_secs, k_n = timed(lambda: (views(batch), batch_size)[1], seconds)
    t_secs, t_n = timed(
        lambda: (per_sample_torchvision_views(batch, cfg, image_size, 3, mean, std), batch_size)[1],
        seconds,
    )
    kornia_rate, tv_rate = k_n / k_secs, t_n / t_secs
    return [
        {
            "augmentation": "kornia, batched (2 views)",
            "images_s": kornia_rate,
            "speedup": kornia_rate / tv_rate,
        },
        {
            "augmentation": "torchvision v2, per sample (2 views)",
            "images_s": tv_rate,
            "speedup": 1.0,
        },
    ]
