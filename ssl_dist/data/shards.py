"""Shard writer, manifest and verification.

A shard set is ``{split}-000000.tar ...`` (WebDataset tar files; each sample is ``KEY.cls`` with
the class index and one image member whose extension names its codec: ``KEY.png`` for in-memory
sources, the file's own bytes as ``KEY.jpg`` / ``KEY.png`` / ``KEY.webp`` for image folders, see
:mod:`ssl_dist.data.prepare`) plus ``manifest.json``. Tar members carry fixed metadata and the
manifest no wall-clock time, so the same input and options give the same bytes.
Every file is written under a temporary name and renamed into place (:mod:`ssl_dist.atomic`),
the manifest last, so a manifest never points at a half-written shard. A manifest is named by the
sha256 of its file's bytes (:func:`manifest_sha256`): the lineage tag of every run and registered
model, and the retrain job's data key.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import webdataset as wds
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from webdataset.tariterators import base_plus_ext

from ssl_dist.atomic import TMP_GLOB, atomic_file, write_atomic
from ssl_dist.config import ConfigError
from ssl_dist.data.sources import Source

MANIFEST = "manifest.json"

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm")
"""Member extensions the stream decodes as a sample's image (the first one present)."""
UNSAFE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})
"""Extensions whose decoders unpickle the payload: webdataset's `pyd`, `pickle`, `pkl`
(pickle.loads) and `pth` (torch.load), and `pt`, torch.load's other usual extension. A `.gz`
after one of them is decompressed by webdataset first and then decoded the same way."""


def is_unsafe(suffix: str) -> bool:
    """Whether a member with this suffix (what follows the sample key, e.g. ``seg.pyd.gz``)
    would be unpickled by its decoder: the stream refuses such samples, `data verify` flags
    them."""
    parts = suffix.lower().split(".")
    while len(parts) > 1 and parts[-1] == "gz":
        parts.pop()
    return parts[-1] in UNSAFE_EXTS


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(ge=0)
    shards: list[ShardInfo]
    codecs: list[str] = []
    """Image member extensions present in the split (``jpg``, ``png``, ``webp``), sorted."""


class SkippedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    """Relative to the input folder."""
    reason: str


MAX_SKIPPED = 100
"""The manifest names at most this many skipped files; `skipped_count` counts them all."""


class Manifest(BaseModel):
    """What `manifest.json` holds; also read back by the stream and the trainer."""

    model_config = ConfigDict(extra="forbid")
    format: int = 1
    source: str
    classes: list[str]
    image_size: tuple[int, int]
    """(height, width) of the images; where they differ (an image folder), the median of the
    images the mean / std were estimated on."""
    channels: int
    """What the stream decodes to: 1 when every image is grey, else 3."""
    samples_per_shard: int
    seed: int
    mean: list[float]
    """Per-channel mean of the train split, in [0, 1]."""
    std: list[float]
    splits: dict[str, SplitInfo]
    created: str = ""
    """Older manifests: when they were written. No longer set: a manifest depends on its input
    and options only."""
    stats_images: int = 0
    """How many train images `mean` / `std` were estimated on; 0: every train image."""
    skipped: list[SkippedFile] = []
    """Input files left out (they did not open as images), at most MAX_SKIPPED of them."""
    skipped_count: int = Field(0, ge=0)

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise ConfigError(f"manifest has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]


def manifest_sha256(url: str) -> str:
    """sha256 of the manifest file's bytes (a path or an fsspec URL): names the exact data a
    run used. Raises OSError (FileNotFoundError...) when it cannot be read."""
    with fsspec.open(url, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def parse_manifest(text: str, where: str) -> Manifest:
    try:
        return Manifest.model_validate(json.loads(text))
    except (ValueError, ValidationError) as e:
        raise ConfigError(f"{where} is not a valid ssl-dist manifest: {e}") from None


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_shard(path: Path, samples: list[tuple[str, bytes, int]]) -> ShardInfo:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0.0) as sink:
            for key, png, label in samples:
                sink.write({"__key__": key, "png": png, "cls": str(label).encode()})
        return ShardInfo(
            name=path.name, samples=len(samples), bytes=tmp.stat().st_size, sha256=_sha256(tmp)
        )


class _Moments:
    """Running per-channel sums for the train split's mean and std."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.s = np.zeros(channels)
        self.s2 = np.zeros(channels)

    def add(self, image: np.ndarray) -> None:
        x = image.reshape(-1, self.s.shape[0]).astype(np.float64) / 255.0
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.s2 += (x * x).sum(0)

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.s / max(self.n, 1)
        var = np.maximum(self.s2 / max(self.n, 1) - mean * mean, 1e-12)
        return mean.round(6).tolist(), np.sqrt(var).round(6).tolist()


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-directory or a non-empty `out` unless `overwrite` (no side effects)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace its shards")


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Check `out`, then drop an old manifest first and its shards."""
    check_output_dir(out, overwrite)
    # The manifest goes first so no reader can pair it with a mix of old and new shards.
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.glob("*.tar"):
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_shards(
    source: Source,
    out: Path,
    samples_per_shard: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Write every split of `source` to `out` and the manifest last. Returns the manifest."""
    if samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    prepare_output_dir(out, overwrite)
    written: list[Path] = []
    try:
        return _write_all(source, out, samples_per_shard, seed, written, progress)
    except BaseException:
        # Nothing half-written: a failed run leaves no manifest and none of its shards.
        for p in written:
            p.unlink(missing_ok=True)
        for p in out.glob(TMP_GLOB):
            p.unlink(missing_ok=True)
        raise


def _write_all(source, out, samples_per_shard, seed, written, progress) -> Manifest:
    moments = _Moments(source.channels)
    splits: dict[str, SplitInfo] = {}
    size: tuple[int, int] | None = None
    for split_name, split in source.splits.items():
        infos: list[ShardInfo] = []
        batch: list[tuple[str, bytes, int]] = []

        def flush(infos=infos, batch=batch, split_name=split_name) -> None:
            path = out / f"{split_name}-{len(infos):06d}.tar"
            written.append(path)
            infos.append(_write_shard(path, batch))
            batch.clear()

        for key, image, label in split:
            if size is None:
                size = (int(image.shape[0]), int(image.shape[1]))
            if split_name == "train":
                moments.add(image)
            batch.append((key, encode_png(image), label))
            if len(batch) == samples_per_shard:
                flush()
            if progress is not None:
                progress(1)
        if batch:
            flush()
        splits[split_name] = SplitInfo(
            samples=sum(s.samples for s in infos), shards=infos, codecs=["png"]
        )
    if size is None:
        raise ConfigError(f"source {source.name} has no images")
    mean, std = moments.result()
    manifest = Manifest(
        source=source.name,
        classes=source.classes,
        image_size=size,
        channels=source.channels,
        samples_per_shard=samples_per_shard,
        seed=seed,
        mean=mean,
        std=std,
        splits=splits,
    )
    write_atomic(out / MANIFEST, manifest.model_dump_json(indent=2))
    return manifest


def read_manifest(out: Path) -> Manifest:
    path = Path(out) / MANIFEST if Path(out).is_dir() else Path(out)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; run `ssl-dist data prepare` first")
    return parse_manifest(path.read_text(), str(path))


def check_file(url: str, info: ShardInfo, checksum: bool = True) -> str | None:
    """Compare one shard file (a path or URL) with its manifest entry: its size (a stat, or a
    HEAD request; not checked where the server does not tell) and, with `checksum`, its sha256
    (reads the whole file). Returns what is wrong, or None."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        size = fs.size(path)
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # a server or filesystem error: the shard cannot be used either
        return f"cannot be read: {type(e).__name__}: {e}"
    if size is not None and size != info.bytes:
        return f"size {size} bytes, manifest says {info.bytes}"
    if checksum:
        h = hashlib.sha256()
        try:
            with fs.open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except Exception as e:
            return f"cannot be read: {type(e).__name__}: {e}"
        if h.hexdigest() != info.sha256:
            return "sha256 does not match the manifest"
    return None


MAX_SAMPLE_LINES = 10
"""`verify` names at most this many undecodable samples per shard, then counts the rest."""


def sample_problem(parts: dict[str, bytes]) -> str | None:
    """Why the stream would skip a sample (its members by suffix, unsafe ones left out)."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        return f"no image ({', '.join(IMAGE_EXTS)})"
    if "cls" not in parts:
        return "no class (.cls)"
    try:
        with Image.open(io.BytesIO(parts[ext])) as im:
            im.load()
    except Exception as e:
        return f"image .{ext} does not decode: {e}"
    try:
        int(parts["cls"])
    except ValueError:
        return f"class {parts['cls'][:20]!r} is not an integer"
    return None


def _scan_members(path: Path, info: ShardInfo) -> list[str]:
    """Read a local shard as the stream groups it (consecutive members of one key form a
    sample) and list what the stream would refuse, skip or miss."""
    problems: list[str] = []
    bad: list[str] = []
    found = 0
    key: str | None = None
    parts: dict[str, bytes] = {}

    def close_sample() -> None:
        nonlocal found
        if key is None:
            return
        found += 1
        why = sample_problem(parts)
        if why:
            bad.append(f"sample {key}: {why}; the stream skips it")

    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None:
                    continue  # no extension: the stream ignores the member
                if prefix != key:
                    close_sample()
                    key, parts = prefix, {}
                if is_unsafe(suffix):
                    # Never read, let alone decoded.
                    problems.append(
                        f"member {member.name}: its decoder would unpickle it; the stream "
                        "refuses the sample (data.allow_unsafe=true only for data you wrote)"
                    )
                    continue
                f = tar.extractfile(member)
                parts[suffix.lower()] = f.read() if f else b""
    except (tarfile.TarError, OSError) as e:
        problems.append(f"cannot be read to its end after {found} samples: {e}")
        key = None  # the sample being read when it broke is lost with the rest
    close_sample()
    problems += bad[:MAX_SAMPLE_LINES]
    if len(bad) > MAX_SAMPLE_LINES:
        problems.append(f"{len(bad) - MAX_SAMPLE_LINES} more samples that do not decode")
    if found != info.samples:
        lost = f": {info.samples - found} lost" if found < info.samples else ""
        problems.append(f"{found} samples, manifest says {info.samples}{lost}")
    return problems


def check_shard(path: Path, info: ShardInfo) -> list[str]:
    """Everything wrong with one local shard: missing, size or sha256 unlike the manifest,
    members the stream refuses (pickle payloads), samples it skips, samples missing."""
    problem = check_file(str(path), info, checksum=False)
    if problem == "missing":
        return [problem]
    problems = [problem] if problem else []
    if not problems and _sha256(path) != info.sha256:
        problems.append("sha256 does not match the manifest")
    return problems + _scan_members(path, info)


def verify(out: Path, on_shard: Callable[[str], None] | None = None) -> list[str]:
    """Check every shard's size, checksum, members and samples. Returns one line per problem,
    each starting with the shard's name."""
    manifest = read_manifest(out)
    root = Path(out) if Path(out).is_dir() else Path(out).parent
    problems = []
    for split in manifest.splits.values():
        for info in split.shards:
            problems += [f"{info.name}: {p}" for p in check_shard(root / info.name, info)]
            if on_shard is not None:
                on_shard(info.name)
    return problems
