"""`ssl-dist data prepare --source imagefolder`: an image folder to shuffled shards, in parallel.

1. List ``root/<class>/...`` or ``root/{train,val}/<class>/...`` once
   (:func:`ssl_dist.data.folder.list_folder`).
2. Put each split in one seeded order, so every shard mixes the classes (a folder lists them
   class by class), and cut it into shards of ``samples_per_shard`` files.
3. Write the shards with a pool of processes, one shard per task
   (:func:`ssl_dist.data.folder.write_shard`: the files' own bytes, bad files skipped). Each
   shard's bytes depend only on its files, so any number of workers writes the same set.
4. Drop shards left empty by skipped files, then write the manifest last, with the per-split
   codecs, the channels (grey only when every image is), the mean / std of a seeded sample of
   ``stats_images`` train images, and the skipped files.

A failed run removes what it wrote, as :func:`ssl_dist.data.shards.write_shards` does.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Generator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ssl_dist.atomic import TMP_GLOB, write_atomic
from ssl_dist.config import ConfigError
from ssl_dist.data.folder import MAX_PIXELS, ShardResult, ShardTask, list_folder, write_shard
from ssl_dist.data.shards import (
    MANIFEST,
    MAX_SKIPPED,
    Manifest,
    ShardInfo,
    SkippedFile,
    SplitInfo,
    prepare_output_dir,
)

RunTasks = Callable[[list[ShardTask]], Generator[ShardResult, None, None]]
"""Runs shard tasks (:func:`ssl_dist.data.folder.write_shard`) and yields results in order."""

STATS_IMAGES = 500
"""Train images the mean / std are estimated on (a seeded sample; all when fewer)."""


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_files(
    root: Path, val_fraction: float, seed: int
) -> tuple[list[str], dict[str, list[tuple[str, int]]], list[tuple[str, str]]]:
    """Class names, per split ``(path relative to root, label)`` in seeded order, and the
    entries not followed."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--input {root} is not a directory")
    refused: list[tuple[str, str]] = []
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train, r = list_folder(root / "train")
        val_classes, val, r2 = list_folder(root / "val")
        if set(val_classes) - set(classes):
            raise ConfigError(
                f"{root}/val has classes missing from train: {set(val_classes) - set(classes)}"
            )
        refused = [(f"train/{p}", why) for p, why in r] + [(f"val/{p}", why) for p, why in r2]
        lists = {
            "train": [(f"train/{p}", c) for p, c in train],
            "val": [(f"val/{p}", c) for p, c in val],
        }
    else:
        if not 0 < val_fraction < 1:
            raise ConfigError(
                f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}"
            )
        classes, files, refused = list_folder(root)
        order = np.random.default_rng(seed).permutation(len(files))
        n_val = max(1, round(len(files) * val_fraction)) if len(files) > 1 else 0
        lists = {
            "train": [files[i] for i in sorted(order[n_val:])],
            "val": [files[i] for i in sorted(order[:n_val])],
        }
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for i, (name, files) in enumerate(lists.items()):
        # One seeded order per split: a shard then holds about the split's class mix.
        order = np.random.default_rng([seed, i]).permutation(len(files))
        splits[name] = [(files[j][0], index[files[j][1]]) for j in order]
    return classes, splits, refused


def plan(
    root: Path,
    out: Path,
    splits: dict[str, list[tuple[str, int]]],
    samples_per_shard: int,
    seed: int,
    stats_images: int,
    max_side: int,
    max_pixels: int,
) -> list[tuple[str, ShardTask]]:
    """``(split, task)`` for every shard, in shard order."""
    tasks = []
    for name, files in splits.items():
        width = max(7, len(str(len(files))))
        keys = [f"{name}{i:0{width}d}" for i in range(len(files))]
        stats: frozenset[str] = frozenset()
        if name == "train":
            k = min(stats_images, len(files)) if stats_images > 0 else len(files)
            picks = np.random.default_rng([seed, 2]).choice(len(files), k, replace=False)
            stats = frozenset(keys[i] for i in picks)
        for s, start in enumerate(range(0, len(files), samples_per_shard)):
            part = range(start, min(start + samples_per_shard, len(files)))
            task = ShardTask(
                root=str(root),
                path=str(out / f"{name}-{s:06d}.tar"),
                samples=[(keys[i], files[i][0], files[i][1]) for i in part],
                stats=stats.intersection(keys[i] for i in part),
                max_side=max_side,
                max_pixels=max_pixels,
            )
            tasks.append((name, task))
    return tasks


def _run(tasks: list[ShardTask], workers: int) -> Generator[ShardResult, None, None]:
    """Results in task order. One worker writes in this process; more use a process pool
    (forkserver or spawn, never fork: the caller may hold threads)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(write_shard, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx)
    try:
        yield from pool.map(write_shard, tasks)
    finally:
        # On an error or close(): shards not started are cancelled, running ones end first.
        pool.shutdown(wait=True, cancel_futures=True)


def _mean_std(results: list[ShardResult], channels: int) -> tuple[list[float], list[float], int]:
    mode = "L" if channels == 1 else "RGB"
    rows = [r.moments[mode] for r in results if mode in r.moments]
    if not rows:
        return [0.5] * channels, [0.25] * channels, 0
    total = np.sum(rows, axis=0)
    n = int(total[0, 0])
    mean = total[1] / n
    std = np.sqrt(np.maximum(total[2] / n - mean * mean, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist(), n


def prepare_imagefolder(
    root: Path,
    out: Path,
    samples_per_shard: int = 1000,
    seed: int = 0,
    val_fraction: float = 0.2,
    *,
    workers: int = 0,
    max_side: int = 0,
    max_pixels: int = MAX_PIXELS,
    stats_images: int = STATS_IMAGES,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    run_tasks: RunTasks | None = None,
) -> Manifest:
    """Write an image folder's shards and manifest into `out`; returns the manifest.

    Args:
        workers: Processes writing shards; 0: every core this process may use.
        max_side: Shrink images whose longer side exceeds it (JPEG quality 95); 0: never.
        stats_images: Train images the mean / std are estimated on; 0: all.
        progress: Called with the number of input files each finished shard held.
        on_plan: Called once with the number of input files, before any is read.
        run_tasks: Runs the shard tasks elsewhere (e.g. as Ray tasks on a cluster whose nodes
            all see `root` and `out` at the same paths) and yields the results in task order;
            closing it must stop the tasks. Default: the process pool of `workers`.
    """
    if samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if max_side < 0 or stats_images < 0 or workers < 0:
        raise ConfigError("--max-side, --workers and the stats sample must not be negative")
    classes, splits, refused = split_files(Path(root), val_fraction, seed)
    if not any(splits.values()):
        raise ConfigError(f"{root} holds no images in <class>/<image> folders")
    if on_plan is not None:
        on_plan(sum(len(f) for f in splits.values()))
    made = not out.exists()
    prepare_output_dir(out, overwrite)
    tasks = plan(root, out, splits, samples_per_shard, seed, stats_images, max_side, max_pixels)
    shard_tasks = [t for _, t in tasks]
    running = (
        run_tasks(shard_tasks) if run_tasks else _run(shard_tasks, workers or default_workers())
    )
    try:
        results = []
        for (_, task), result in zip(tasks, running, strict=True):
            results.append(result)
            if progress is not None:
                progress(len(task.samples))
        return _finish(out, classes, tasks, results, refused, samples_per_shard, seed)
    except BaseException:
        running.close()  # no writer is left running when the shards are removed
        # Nothing half-written: a failed run leaves no manifest and none of its shards.
        for _, task in tasks:
            Path(task.path).unlink(missing_ok=True)
        for p in out.glob(TMP_GLOB):
            p.unlink(missing_ok=True)
        if made and not any(out.iterdir()):
            out.rmdir()
        raise


def _finish(out, classes, tasks, results, refused, samples_per_shard, seed) -> Manifest:
    skipped = sorted(list(refused) + [s for r in results for s in r.skipped])
    if sum(r.samples for r in results) == 0:
        reasons = "; ".join(f"{p}: {why}" for p, why in skipped[:3])
        more = " ..." if len(skipped) > 3 else ""
        raise ConfigError(f"no readable images among {len(skipped)} files ({reasons}{more})")
    splits: dict[str, SplitInfo] = {}
    for (name, task), r in zip(tasks, results, strict=True):
        if r.samples == 0:  # every file of this shard was skipped
            Path(task.path).unlink(missing_ok=True)
            continue
        info = splits.setdefault(name, SplitInfo(samples=0, shards=[], codecs=[]))
        info.shards.append(
            ShardInfo(name=r.name, samples=r.samples, bytes=r.bytes, sha256=r.sha256)
        )
        info.samples += r.samples
        info.codecs = sorted(set(info.codecs) | set(r.codecs))
    channels = 1 if all(r.grey == r.samples for r in results) else 3
    train = [r for (name, _), r in zip(tasks, results, strict=True) if name == "train"]
    mean, std, n_stats = _mean_std(train, channels)
    # Images differ in size: the median height and width of the sampled ones.
    sizes = np.array([s for r in train for s in r.sizes] or [(0, 0)])
    size = (int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1])))
    manifest = Manifest(
        source="imagefolder",
        classes=classes,
        image_size=size,
        channels=channels,
        samples_per_shard=samples_per_shard,
        seed=seed,
        mean=mean,
        std=std,
        splits=splits,
        stats_images=n_stats,
        skipped=[SkippedFile(path=p, reason=why) for p, why in skipped[:MAX_SKIPPED]],
        skipped_count=len(skipped),
    )
    write_atomic(out / MANIFEST, manifest.model_dump_json(indent=2))
    return manifest
