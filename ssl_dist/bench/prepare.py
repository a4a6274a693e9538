"""`ssl-dist bench prepare`: how fast an image folder becomes shards, against its limits.

The folder is a generated ImageNet-layout JPEG folder (:func:`ssl_dist.data.synthetic.
make_imagefolder`, from Fashion-MNIST when its IDX files are installed, else scikit-learn's
digits), written once and cached in the work directory. One run measures, on the same files:

* the physical limit: read every input file and write its bytes into one tar (no decode);
* ``data prepare`` (:func:`ssl_dist.data.prepare.prepare_imagefolder`: original bytes, seeded
  order, a process pool) with 1 worker and with every core;
* a decode + PNG re-encode writer, one process (what ``data prepare`` did before it kept the
  files' bytes: decode with PIL, convert to RGB, encode PNG, write to a tar), timed on a
  fixed subset of the files to keep the run short;

and the bytes each one writes against the bytes of its input (the sum of file sizes, and the
blocks the input folder takes on disk). Each writer runs ``--repeats`` times; the table gives the
fastest run (the one least disturbed by other load on the machine) and the spread (slowest /
fastest). Every file is read once before the timings, so each
measurement reads from the page cache and none pays for the first read alone. The shards of the
all-cores run stay in the work directory: ``bench loader --source folder`` reads them.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from ssl_dist.bench.report import table, write
from ssl_dist.config import ConfigError
from ssl_dist.data.folder import IMAGE_SUFFIXES
from ssl_dist.data.prepare import default_workers, prepare_imagefolder
from ssl_dist.data.shards import encode_png, read_manifest
from ssl_dist.data.sources import FASHION_MNIST_DIR
from ssl_dist.data.synthetic import make_imagefolder

T = TypeVar("T")

DEFAULT_IMAGES = 20_000
PNG_IMAGES = 2_000
"""Files the decode + PNG writer is timed on (the first ones in the folder's order)."""
MIN_IMAGES = 50
DONE = ".complete"
"""Marks a generated folder as whole (a run stopped mid-way is written again)."""


def dataset() -> str:
    """The data set the folder is made from: Fashion-MNIST when installed, else digits."""
    return "fashion-mnist" if FASHION_MNIST_DIR.is_dir() else "digits"


def shard_size(images: int) -> int:
    """Samples per shard: 1000 as ``data prepare``, fewer for small folders so there are about
    20 shards (every writer and loader worker gets some)."""
    return 1000 if images >= 20_000 else max(10, images // 20)


def folder(work: Path, images: int) -> Path:
    """The generated folder of `images` files (10% in ``val``), made once."""
    if images < MIN_IMAGES:
        raise ConfigError(f"--images must be at least {MIN_IMAGES}, got {images}")
    name = dataset()
    root = Path(work) / f"folder-{name}-{images}"
    if not (root / DONE).is_file():
        if root.exists():
            shutil.rmtree(root)
        n_val = images // 10
        start = time.perf_counter()
        print(f"generating {images} images ({name}) in {root} ...", flush=True)
        make_imagefolder(root, images - n_val, n_val, seed=0, dataset=name)
        (root / DONE).write_text("")
        print(f"generated in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def shards(work: Path, images: int) -> tuple[Path, Path]:
    """``(folder, shards)``: the folder and its shards written with every core, made once."""
    root = folder(work, images)
    out = Path(work) / f"shards-{root.name.removeprefix('folder-')}"
    if not (out / "manifest.json").is_file():
        prepare_imagefolder(root, out, shard_size(images), overwrite=True)
    return root, out


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _tar_dir_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def _raw_tar(files: list[Path], path: Path) -> int:
    """Every file's bytes into one tar, no decode; the tar's size."""
    with tarfile.open(path, "w") as tar:
        for i, f in enumerate(files):
            data = f.read_bytes()
            info = tarfile.TarInfo(f"{i:08d}{f.suffix.lower()}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def _png_tar(files: list[Path], path: Path) -> tuple[int, int]:
    """Decode + RGB + PNG (the old writer's ``compress_level=1``) into one tar; (images
    written, tar size). Files that do not open are skipped, as the old writer could not."""
    written = 0
    with tarfile.open(path, "w") as tar:
        for i, f in enumerate(files):
            try:
                with Image.open(f) as im:
                    pixels = im.convert("RGB")
                data = encode_png(np.asarray(pixels))
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
            for name, payload in ((f"{i:08d}.png", data), (f"{i:08d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            written += 1
    return written, path.stat().st_size


def _timed(fn: Callable[[], T], repeats: int) -> tuple[list[float], T]:
    """`fn` run `repeats` times: the seconds of each run and the last run's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def _row(writer: str, workers: int, n: int, times: list[float], out_bytes: int, in_bytes: int):
    """The fastest of the runs (the least disturbed by other load) and the spread."""
    secs = min(times)
    return {
        "writer": writer,
        "workers": workers,
        "images": n,
        "seconds": secs,
        "images_s": n / secs,
        "spread": max(times) / secs,
        "out_MB": out_bytes / 1e6,
        "out_vs_input": out_bytes / in_bytes,
        "runs_s": times,
    }


def run(out: Path, work: Path, images: int, png_images: int, repeats: int = 3) -> None:
    if png_images < 1 or repeats < 1:
        raise ConfigError(
            f"--png-images and --repeats must be at least 1, got {png_images} and {repeats}"
        )
    work = Path(work)
    root = folder(work, images)
    files = _files(root)
    sizes = [f.stat() for f in files]
    in_bytes = sum(s.st_size for s in sizes)
    in_disk = sum(s.st_blocks * 512 for s in sizes)
    for f in files:  # page cache: every timing below reads the same warm files
        f.read_bytes()
    n = len(files)
    cores = default_workers()
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    rows = []

    times, raw = _timed(lambda: _raw_tar(files, scratch / "raw.tar"), repeats)
    rows.append(_row("raw tar: read + write bytes (limit)", 1, n, times, raw, in_bytes))

    per_shard = shard_size(images)
    manifests = {}
    for workers in sorted({1, cores}):
        dest = scratch / f"shards-w{workers}"
        if workers == cores:
            dest = work / f"shards-{root.name.removeprefix('folder-')}"
        times, manifests[workers] = _timed(
            partial(prepare_imagefolder, root, dest, per_shard, workers=workers, overwrite=True),
            repeats,
        )
        size = _tar_dir_bytes(dest)
        rows.append(_row("data prepare (original bytes)", workers, n, times, size, in_bytes))

    subset = files[: min(png_images, n)]
    sub_bytes = sum(f.stat().st_size for f in subset)
    times, (written, png) = _timed(lambda: _png_tar(subset, scratch / "png.tar"), repeats)
    name = f"decode + PNG re-encode ({len(subset)} files)"
    rows.append(_row(name, 1, len(subset), times, png, sub_bytes))
    rows[-1]["png_written"] = written
    shutil.rmtree(scratch)

    limit = rows[0]["images_s"]
    for r in rows:
        r["vs_limit"] = r["images_s"] / limit
    # Both worker counts must write the same bytes: the determinism the shards promise.
    digests = {
        w: [s.sha256 for sp in m.splits.values() for s in sp.shards] for w, m in manifests.items()
    }
    same = len({tuple(d) for d in digests.values()}) == 1
    final = read_manifest(work / f"shards-{root.name.removeprefix('folder-')}")
    print(
        f"prepare bench: {n} files ({dataset()}, {final.skipped_count} corrupt skipped), "
        f"{in_bytes / 1e6:,.1f} MB in files, {in_disk / 1e6:,.1f} MB on disk; "
        f"{per_shard} samples per shard; {cores} cores; "
        f"same shards at 1 and {cores} workers: {same}"
    )
    print(
        table(
            rows,
            [
                "writer",
                "workers",
                "images",
                "seconds",
                "images_s",
                "spread",
                "vs_limit",
                "out_MB",
                "out_vs_input",
            ],
        )
    )
    write(
        out,
        "prepare",
        rows,
        {
            "dataset": dataset(),
            "folder": str(root),
            "files": n,
            "input_bytes": in_bytes,
            "input_disk_bytes": in_disk,
            "samples_per_shard": per_shard,
            "cores": cores,
            "skipped": final.skipped_count,
            "same_shards_across_workers": same,
            "repeats": repeats,
        },
    )
    print(f"\nwrote {out}")
