"""Image folders to shards, the part that runs in each writer process.

A folder is listed once (:func:`list_folder`: symlinks that leave the input root are not
followed); :mod:`ssl_dist.data.prepare` puts the files in a seeded order and hands each shard to
a process as a :class:`ShardTask`. :func:`write_shard` probes every file (opens and decodes it,
at a reduced size where the codec allows), skips what does not open, and writes the file's own
bytes: JPEG, PNG and WebP are never re-encoded (other formats are stored once as lossless PNG),
unless ``max_side`` asks to shrink a larger image (re-encoded once as JPEG quality 95). Tar
members carry fixed metadata, so the same input gives the same bytes.

This module imports no more than NumPy and Pillow: every writer process loads it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssl_dist.atomic import atomic_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
"""Files with these suffixes (any case) are listed; anything else in a class folder is ignored."""
KEPT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
"""Formats stored with their original bytes, and the member extension that names the codec."""
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
MAX_PIXELS = 100_000_000
"""Images with more pixels are skipped as decompression bombs (ImageNet's largest: ~10 M)."""
STATS_SIDE = 64
"""Sampled images are resized to this square before their pixels enter the mean/std."""
JPEG_QUALITY = 95


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its samples ``(key, path relative to root, label)`` in order."""

    root: str
    path: str
    samples: list[tuple[str, str, int]]
    stats: frozenset[str] = frozenset()
    """Keys of the samples whose pixels go into the mean/std estimate."""
    max_side: int = 0
    max_pixels: int = MAX_PIXELS


@dataclass
class ShardResult:
    name: str
    samples: int
    bytes: int
    sha256: str
    codecs: dict[str, int] = field(default_factory=dict)
    grey: int = 0
    """Readable images stored in a grey mode."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(path relative to root, reason)`` of each file that did not open."""
    moments: dict[str, np.ndarray] = field(default_factory=dict)
    """Per mode (``L``, ``RGB``): rows [images, sum, sum of squares] per channel."""
    sizes: list[tuple[int, int]] = field(default_factory=list)
    """(height, width) of the sampled images."""


class Unreadable(Exception):
    """A file that does not open as an image; its message is the reason recorded."""


def _reason(e: Exception) -> str:
    """The exception as a reason, without object addresses (the manifest must not vary)."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")
    return f"truncated ({text})" if "truncated" in text.lower() else text


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def list_folder(root: Path) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    """Class names, ``(path relative to root, class)`` of every image file (sorted), and
    ``(path, reason)`` of the entries not followed (links that leave `root`)."""
    real_root = os.path.realpath(root)
    classes, files, refused = [], [], []
    seen: set[str] = set()
    for entry in sorted(os.listdir(root)):
        if entry.startswith("."):
            continue
        top = os.path.join(root, entry)
        if not os.path.isdir(top):
            continue
        if not _inside(os.path.realpath(top), real_root):
            refused.append((entry, "symlink outside the input root"))
            continue
        classes.append(entry)
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            real_dir = os.path.realpath(dirpath)
            if real_dir in seen:  # a link back to a folder already walked
                dirnames[:] = []
                continue
            seen.add(real_dir)
            keep = []
            for d in sorted(dirnames):
                full = os.path.join(dirpath, d)
                if not os.path.islink(full) or _inside(os.path.realpath(full), real_root):
                    keep.append(d)
                else:
                    refused.append((os.path.relpath(full, root), "symlink outside the input root"))
            dirnames[:] = keep
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                    continue
                rel = os.path.relpath(full, root)
                # Its folder lies inside the root: only a link can lead out.
                if os.path.islink(full) and not _inside(os.path.realpath(full), real_root):
                    refused.append((rel, "symlink outside the input root"))
                elif os.path.isfile(full):
                    files.append((rel, entry))
                else:
                    refused.append((rel, "not a regular file (a broken link?)"))
    return classes, sorted(files), refused


def _open(data: bytes, max_pixels: int, least: int = 1) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode `data`; returns the image and its (width, height). A JPEG is
    decoded at a reduced scale (1/8, or no less than `least` px a side): every byte is still
    read, so a truncated file fails here too. Raises Unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb warning: the limit is ours
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise Unreadable(f"decompression bomb: {w}x{h} pixels, limit {max_pixels}")
            if im.format == "JPEG":
                im.draft(im.mode, (min(w, max(least, w // 8)), min(h, max(least, h // 8))))
            im.load()
            return im, (w, h)
    except Unreadable:
        raise
    except Image.DecompressionBombError as e:
        raise Unreadable(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise Unreadable("not an image Pillow can identify") from None
    except Exception as e:  # Pillow raises many types for broken files
        raise Unreadable(_reason(e)) from None


def _reencode(data: bytes, size: tuple[int, int], max_side: int) -> tuple[bytes, str]:
    """Shrink to `max_side` on the longer side (aspect kept) and encode as JPEG, or store a
    format the stream does not read as its own as lossless PNG."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = size
        buf = io.BytesIO()
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
            if im.format == "JPEG":
                im.draft(im.mode, target)  # decode at no less than the target size
            rgb = im.convert("L" if im.mode in GREY_MODES else "RGB")
            rgb.resize(target, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=JPEG_QUALITY)
            return buf.getvalue(), "jpg"
        im.seek(0)
        im.convert("L" if im.mode in GREY_MODES else "RGB").save(buf, "PNG")
        return buf.getvalue(), "png"


def _add_moments(result: ShardResult, im: Image.Image, size: tuple[int, int]) -> None:
    result.sizes.append((size[1], size[0]))
    for mode in ("L", "RGB"):
        small = im.convert(mode).resize((STATS_SIDE, STATS_SIDE), Image.Resampling.BILINEAR)
        x = np.asarray(small, dtype=np.float64).reshape(STATS_SIDE * STATS_SIDE, -1) / 255.0
        row = np.stack([np.ones(x.shape[1]), x.mean(0), (x * x).mean(0)])
        result.moments[mode] = result.moments.get(mode, np.zeros_like(row)) + row


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def sample_file(root: str, rel: str, max_pixels: int, max_side: int, least: int = 1):
    """``(payload, ext, decoded image, original (width, height))`` of one file; the image is
    decoded at a reduced size where the codec allows (no less than `least` px a side).
    Raises Unreadable."""
    try:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
    except OSError as e:
        raise Unreadable(f"cannot read: {e.strerror or e}") from None
    im, size = _open(data, max_pixels, least)
    ext = KEPT.get(im.format or "")
    if ext is None or (max_side and max(size) > max_side):
        try:
            data, ext = _reencode(data, size, max_side)
        except Exception as e:
            raise Unreadable(_reason(e)) from None
    return data, ext, im, size


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard (atomically) and report what went in and what was skipped."""
    path = Path(task.path)
    result = ShardResult(name=path.name, samples=0, bytes=0, sha256="")
    with atomic_file(path) as tmp:
        with (
            open(tmp, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
        ):
            for key, rel, label in task.samples:
                least = STATS_SIDE if key in task.stats else 1
                try:
                    data, ext, im, size = sample_file(
                        task.root, rel, task.max_pixels, task.max_side, least
                    )
                except Unreadable as e:
                    result.skipped.append((rel, str(e)))
                    continue
                # Members in the order webdataset writes them: sorted by extension.
                _member(tar, f"{key}.cls", str(label).encode())
                _member(tar, f"{key}.{ext}", data)
                result.samples += 1
                result.codecs[ext] = result.codecs.get(ext, 0) + 1
                result.grey += im.mode in GREY_MODES
                if key in task.stats:
                    _add_moments(result, im, size)
        result.bytes = tmp.stat().st_size
        result.sha256 = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return result
