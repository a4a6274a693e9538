"""A real-looking image folder in the ImageNet layout, made from a small real data set.

``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``, class-sorted on disk as ImageNet is. Each
image is a digit (scikit-learn's bundled 8x8 digits) or a Fashion-MNIST item, upsampled and
placed on a canvas of random size (longer side ``min_side..max_side`` px) and aspect ratio
(0.5-2), saved as JPEG at a random quality. A few files are the awkward cases a real folder
holds: greyscale and CMYK JPEGs, PNGs (some behind a ``.JPEG`` name), and corrupt files (a
truncated JPEG, a text file named ``.JPEG``, a PNG whose header claims a decompression bomb).
Seeded and deterministic: the same arguments write the same bytes. Used by the tests and by the
data-preparation benchmark.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_dist.config import ConfigError
from ssl_dist.data.sources import Source, digits, fashion_mnist

KINDS = ("jpeg", "grey", "cmyk", "png", "png_as_jpeg", "truncated", "not_image", "bomb")
"""What a generated file is. The last three are corrupt: `data prepare` must skip them."""
CORRUPT = frozenset({"truncated", "not_image", "bomb"})
DEFAULT_MIX = {"grey": 0.04, "cmyk": 0.02, "png": 0.03, "png_as_jpeg": 0.01}
"""Share of each special kind among the readable files (the rest are colour JPEGs)."""
BOMB_SIDE = 40_000
"""The side a bomb's header claims: 1.6 G pixels, beyond any sane limit."""


@dataclass
class FolderSummary:
    """What was written: files per split, the kind of each file, class names."""

    root: Path
    classes: list[str]
    files: dict[str, list[tuple[Path, str, int]]] = field(default_factory=dict)
    """Per split: ``(path, kind, label)`` in the order written (class-sorted)."""

    def paths(self, *kinds: str) -> list[Path]:
        return [p for fs in self.files.values() for p, k, _ in fs if k in kinds]

    def readable(self, split: str) -> int:
        return sum(k not in CORRUPT for _, k, _ in self.files[split])


def _canvas_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(width, height): longer side uniform in [min_side, max_side], aspect log-uniform 0.5-2."""
    long_side = int(rng.integers(min_side, max_side + 1))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height
    if aspect >= 1:
        w, h = long_side, round(long_side / aspect)
    else:
        w, h = round(long_side * aspect), long_side
    return max(w, 8), max(h, 8)


def render(item: np.ndarray, rng: np.random.Generator, min_side: int, max_side: int) -> Image.Image:
    """One grey item upsampled and pasted, in colour, on a noisy canvas of random size."""
    w, h = _canvas_size(rng, min_side, max_side)
    side = max(4, int(min(w, h) * rng.uniform(0.5, 0.95)))
    fg = rng.integers(128, 256, 3)
    bg = rng.integers(0, 96, 3)
    glyph = np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BILINEAR))
    alpha = glyph[..., None].astype(np.float32) / 255.0
    tile = (alpha * fg + (1 - alpha) * bg).astype(np.uint8)
    canvas = np.empty((h, w, 3), np.uint8)
    canvas[:] = bg
    canvas = np.clip(canvas + rng.normal(0, 8, canvas.shape), 0, 255).astype(np.uint8)
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    canvas[y : y + side, x : x + side] = tile
    return Image.fromarray(canvas)


def bomb_png() -> bytes:
    """A valid PNG signature and header claiming BOMB_SIDE x BOMB_SIDE pixels, a few bytes of
    data: opening it is cheap, decoding it would need gigabytes."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encode(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """The file's bytes and its suffix for one kind."""
    buf = io.BytesIO()
    quality = int(rng.integers(50, 96))
    if kind in ("jpeg", "truncated"):
        image.save(buf, "JPEG", quality=quality)
    elif kind == "grey":
        image.convert("L").save(buf, "JPEG", quality=quality)
    elif kind == "cmyk":
        image.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif kind in ("png", "png_as_jpeg"):
        image.save(buf, "PNG", compress_level=1)
    elif kind == "not_image":
        return b"<html>this is not an image</html>\n", ".JPEG"
    elif kind == "bomb":
        return bomb_png(), ".png"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    data = buf.getvalue()
    if kind == "truncated":
        data = data[: len(data) // 2]
    return data, ".png" if kind == "png" else ".JPEG"


def _kinds(n: int, rng: np.random.Generator, mix: dict[str, float], corrupt: int) -> list[str]:
    names = ["jpeg", *mix]
    p = np.array([1.0 - sum(mix.values()), *mix.values()])
    kinds = [names[i] for i in rng.choice(len(names), size=n, p=p)]
    # At least one of each special kind, then the corrupt files, at distinct random places
    # (the corrupt ones cycle through the corrupt kinds).
    special = [k for k, share in mix.items() if share > 0]
    special += [("truncated", "not_image", "bomb")[j % 3] for j in range(corrupt)]
    places = rng.choice(n, size=min(len(special), n), replace=False)
    for kind, i in zip(special, places, strict=False):
        kinds[int(i)] = kind
    return kinds


def _items(source: Source, split: str) -> tuple[list[np.ndarray], list[int]]:
    s = source.splits[split]
    return [s.load(i) for i in range(len(s))], list(s.labels)


def make_imagefolder(
    root: Path,
    n_train: int = 1000,
    n_val: int = 200,
    *,
    seed: int = 0,
    dataset: str = "digits",
    min_side: int = 48,
    max_side: int = 640,
    corrupt: int = 3,
    mix: dict[str, float] | None = None,
) -> FolderSummary:
    """Write ``root/{train,val}/<class>/<name>`` and return what was written.

    Args:
        n_train, n_val: Files per split (corrupt ones included). Items repeat, each time on
            another canvas, when a split asks for more than the data set holds.
        dataset: ``digits`` (bundled with scikit-learn) or ``fashion-mnist`` (Debian's
            dataset-fashion-mnist).
        min_side, max_side: Range of the canvas's longer side in pixels.
        corrupt: Corrupt files per split (truncated, not an image, bomb, in turn).
        mix: Share of each special readable kind (default :data:`DEFAULT_MIX`); each kind
            with a share appears at least once in a split that has room.
    """
    if not 8 <= min_side <= max_side:
        raise ConfigError(f"need 8 <= min_side <= max_side, got {min_side}, {max_side}")
    if dataset == "digits":
        source = digits(seed=seed)
    elif dataset == "fashion-mnist":
        source = fashion_mnist()
    else:
        raise ConfigError(f"unknown dataset {dataset!r}: choose digits or fashion-mnist")
    classes = [f"n{i:08d}" for i in range(len(source.classes))]
    summary = FolderSummary(Path(root), classes)
    for split_index, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        rng = np.random.default_rng([seed, split_index])
        items, labels = _items(source, split)
        picks = rng.integers(0, len(items), n)
        kinds = _kinds(n, rng, DEFAULT_MIX if mix is None else mix, corrupt)
        # Class-sorted, as ImageNet is: every class folder holds only its own files.
        order = sorted(range(n), key=lambda i: (labels[picks[i]], i))
        written = []
        for j, i in enumerate(order):
            label = labels[picks[i]]
            image = render(items[picks[i]], rng, min_side, max_side)
            data, suffix = encode(image, kinds[i], rng)
            path = summary.root / split / classes[label] / f"{classes[label]}_{j:07d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append((path, kinds[i], label))
        summary.files[split] = written
    return summary
