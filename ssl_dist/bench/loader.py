"""`ssl-dist bench loader`: how fast images reach the training step.

One run measures, on the same images:
* the raw tar read rate (bytes/s and samples/s, no decode): the ceiling;
* the shard stream (`ssl_dist.data.stream`) with 1 and 2 loader workers;
* a plain map-style Dataset of individual files through a DataLoader, 1 and 2 workers;
* two-view augmentation: kornia on whole batches vs torchvision v2 one image at a time.

Sources: ``digits`` / ``fashion-mnist`` (small square images; the stream decodes the evaluation
view, the baseline one PNG file per sample), or ``folder``: the generated JPEG folder of
``bench prepare`` (images of 48-640 px, any aspect) and its shards. There the stream cuts the two
training views' random-resized crops in the loader (``crop_scale``, each image decoded once,
reduced-size JPEG decode for large crops), and the baseline is torchvision's ``ImageFolder``
with two ``RandomResizedCrop`` per image on the same files (the corrupt ones left out), at the
same crop scale, output size and worker count. Rates count images (each with two views) and
are also given per loader worker: each worker is one core.

``--consumer RECIPE`` (default: the Fashion-MNIST CPU recipe) also measures, in the same run,
how many images one training worker of that recipe consumes per second (its per-worker batch,
one thread, the single-process loop on Fashion-MNIST shards, digits when Fashion-MNIST is not
installed): ``vs_consumer`` is each loader's rate per worker over it, i.e. how many training
workers one loader core keeps fed.
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ssl_dist.bench import prepare as bench_prepare
from ssl_dist.bench.report import table, timed, write
from ssl_dist.config import ConfigError, DataConfig, ViewsConfig, load_config
from ssl_dist.data.folder import IMAGE_SUFFIXES
from ssl_dist.data.reader import decode_image
from ssl_dist.data.shards import IMAGE_EXTS, read_manifest, write_shards
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
                    n += m.name.rsplit(".", 1)[-1] in IMAGE_EXTS
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
            if time.perf_counter() - t0 >= seconds:
                break
        else:
            it = make_iter()
    secs = time.perf_counter() - t0
    del it  # stops the loader workers before the next measurement starts its own
    return {"reader": name, "workers": workers, "images_s": n / secs, "startup_s": startup}


class TwoCrops:
    """The baseline's transform: two torchvision random-resized crops of one PIL image,
    uint8 ``[2, C, size, size]`` (the stream's ``Batch.crops`` per image)."""

    def __init__(self, size: int, scale: tuple[float, float]) -> None:
        from torchvision.transforms import v2

        self.crop = v2.RandomResizedCrop(size, scale=scale, antialias=True)
        self.to_tensor = v2.PILToTensor()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.to_tensor(self.crop(image)) for _ in range(2)])


class NotSkipped:
    """`ImageFolder`'s file filter: image suffixes, less the files `data prepare` skipped."""

    def __init__(self, root: Path, skipped: set[str]) -> None:
        self.root, self.skipped = root, skipped

    def __call__(self, path: str) -> bool:
        rel = Path(path).relative_to(self.root).as_posix()
        return Path(path).suffix.lower() in IMAGE_SUFFIXES and rel not in self.skipped


def _baseline(source: str, work: Path, folder_work: Path, images: int, image_size: int, scale):
    """``(shards, baseline Dataset, its name, the stream's crop_scale)``."""
    if source != "folder":
        if images:
            raise ConfigError("--images applies to --source folder only")
        shards, files = _prepare(work, source)
        ds = PngFiles(files, image_size, read_manifest(shards).channels)
        return shards, ds, "map-style Dataset (PNG files)", None
    from torchvision.datasets import ImageFolder

    root, shards = bench_prepare.shards(folder_work, images or bench_prepare.DEFAULT_IMAGES)
    skipped = {s.path for s in read_manifest(shards).skipped}
    ds = ImageFolder(
        str(root / "train"),
        transform=TwoCrops(image_size, scale),
        is_valid_file=NotSkipped(root, skipped),
    )
    return shards, ds, "map-style ImageFolder + 2x RandomResizedCrop", scale


CONSUMER_STEPS = 12
"""Training steps timed for ``--consumer`` (after the loop's warm-up steps)."""


def consumer_rate(recipe: str, work: Path) -> dict:
    """Images/s one training worker of `recipe` consumes: its per-worker batch through the
    single-process loop on one thread, on Fashion-MNIST (or digits) shards."""
    from ssl_dist.bench.scaling import bare_rate
    from ssl_dist.bench.train import WARMUP
    from ssl_dist.data.sources import FASHION_MNIST_DIR

    source = "fashion-mnist" if Path(FASHION_MNIST_DIR).is_dir() else "digits"
    shards, _ = _prepare(work / f"consumer-{source}", source)
    cfg = load_config(
        recipe,
        [
            f"data.manifest={shards / 'manifest.json'}",
            f"run.max_steps={WARMUP + CONSUMER_STEPS}",
            "run.epochs=1000",
            "tracking.enabled=false",
        ],
    )
    rate = bare_rate(cfg, threads=1)
    return {"recipe": recipe, "data": source, "batch_size": cfg.data.batch_size, **rate}


def run(
    out: Path,
    work: Path,
    source: str,
    image_size: int,
    batch_size: int,
    seconds: float,
    images: int = 0,
    folder_work: Path = Path("work/bench-prepare"),
    workers_list: tuple[int, ...] = (1, 2),
    consumer: str = "",
):
    if source not in ("digits", "fashion-mnist", "folder"):
        raise ConfigError(f"unknown --source {source!r}: choose digits, fashion-mnist or folder")
    if image_size < 8 or batch_size < 1 or seconds <= 0 or min(workers_list) < 1:
        raise ConfigError("need --image-size >= 8, --batch-size >= 1, --seconds > 0, workers >= 1")
    if consumer and not Path(consumer).is_file():
        raise ConfigError(f"--consumer {consumer!r}: no such recipe file")
    torch.set_num_threads(1)
    scale = ViewsConfig().crop_scale
    shards, ds, base_name, crop_scale = _baseline(
        source, work, folder_work, images, image_size, scale
    )
    manifest = read_manifest(shards)
    rows = [_tar_rate(shards, seconds)]
    stream_name = "ssl-dist stream (shards" + (", 2 loader crops)" if crop_scale else ")")
    for workers in workers_list:
        cfg = DataConfig(
            manifest=str(shards / "manifest.json"),
            batch_size=batch_size,
            image_size=image_size,
            loader_workers=workers,
        )
        epoch = iter(range(1 << 30))
        rows.append(
            _loader_rate(
                stream_name,
                workers,
                lambda cfg=cfg, epoch=epoch: (
                    (b.images if b.crops is None else b.crops, b.labels)
                    for b in stream(cfg, 0, 1, next(epoch), crop_scale=crop_scale)
                ),
                seconds,
            )
        )
        rows.append(
            _loader_rate(
                base_name,
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
        if r["workers"]:
            r["per_worker"] = r["images_s"] / r["workers"]
    aug = _views_rates(manifest, image_size, batch_size, seconds)
    fed = consumer_rate(consumer, work) if consumer else None
    columns = ["reader", "workers", "images_s", "per_worker", "vs_map_style", "vs_raw_tar"]
    if fed:
        for r in rows:
            if r["workers"]:
                r["vs_consumer"] = r["per_worker"] / fed["images_s"]
        columns.append("vs_consumer")
    views = f", two views per image (crop scale {crop_scale})" if crop_scale else ""
    print(f"loader bench: {source}, {image_size}px, batch {batch_size}{views}")
    if fed:
        print(
            f"consumer: one training worker of {consumer} (batch {fed['batch_size']}, 1 thread, "
            f"{fed['data']}) takes {fed['images_s']:.0f} images/s"
        )
    print(table(rows, [*columns, "startup_s", "MB_s"]))
    print()
    print(table(aug, ["augmentation", "images_s", "speedup"]))
    write(
        out,
        "loader",
        rows,
        {
            "augmentation": aug,
            "source": source,
            "image_size": image_size,
            "batch_size": batch_size,
            "crop_scale": crop_scale,
            "shards": str(shards),
            "consumer": fed,
        },
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
