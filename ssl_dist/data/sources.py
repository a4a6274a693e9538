"""In-memory image sources that `ssl-dist data prepare` turns into shards (image folders:
:mod:`ssl_dist.data.prepare`).

Each reader returns a :class:`Source`: class names and, per split, a list of
``(key, image, label)`` where ``image`` is a uint8 array ``[H, W]`` (grey) or ``[H, W, 3]``.
A source without a split of its own is split into train / val with a seeded permutation.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssl_dist.config import ConfigError

FASHION_MNIST = "fashion-mnist"
"""The Fashion-MNIST source's name (in its manifests)."""
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's `dataset-fashion-mnist` package puts the IDX files."""

FASHION_MNIST_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


@dataclass
class Split:
    """One split: images are loaded lazily so that large folders stream through."""

    keys: list[str]
    labels: list[int]
    load: Callable[[int], np.ndarray]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, int]]:
        for i, key in enumerate(self.keys):
            yield key, self.load(i), self.labels[i]


@dataclass
class Source:
    name: str
    classes: list[str]
    channels: int
    splits: dict[str, Split] = field(default_factory=dict)


def _array_split(name: str, images: np.ndarray, labels: Sequence[int] | np.ndarray) -> Split:
    return Split(
        keys=[f"{name}{i:07d}" for i in range(len(images))],
        labels=[int(v) for v in labels],
        load=lambda i: images[i],
    )


def _seeded_split(images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int):
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, round(len(images) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return {
        "train": _array_split("train", images[train], labels[train]),
        "val": _array_split("val", images[val], labels[val]),
    }


def head(source: Source, n: int) -> Source:
    """The first `n` samples of each split (for quick runs on a source whose order is already
    mixed, as Fashion-MNIST's is)."""
    splits = {name: Split(s.keys[:n], s.labels[:n], s.load) for name, s in source.splits.items()}
    return Source(source.name, source.classes, source.channels, splits)


def holdout_name(name: str, n: int) -> str:
    """The name of source `name` with its last `n` train samples held out (:func:`holdout`)."""
    return f"{name}-holdout{n}"


def holdout(source: Source, n: int) -> Source:
    """`source` for tuning: the last `n` samples of its train split become ``val`` and its own
    ``val`` split (for Fashion-MNIST the official test set) is left out, so that nothing chosen
    on this source has seen it."""
    train = source.splits["train"]
    if not 0 < n < len(train):
        raise ConfigError(f"holdout must lie between 1 and {len(train) - 1} samples, got {n}")
    cut = len(train) - n
    splits = {
        "train": Split(train.keys[:cut], train.labels[:cut], train.load),
        "val": Split(train.keys[cut:], train.labels[cut:], lambda i: train.load(cut + i)),
    }
    return Source(holdout_name(source.name, n), source.classes, source.channels, splits)


def digits(val_fraction: float = 0.2, seed: int = 0) -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images, 16 grey levels) scaled to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    classes = [str(c) for c in bunch.target_names]
    return Source("digits", classes, 1, _seeded_split(images, labels, val_fraction, seed))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise ConfigError(
        f"{root} has no {stem}[.gz]; install Debian's dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist) or pass --input DIR with the IDX files"
    )


def fashion_mnist(root: Path | None = None) -> Source:
    """Fashion-MNIST from IDX files; keeps the official train / test split (test -> `val`)."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    splits = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ConfigError(f"{root}: {prefix} images and labels do not match")
        splits[split] = _array_split(split, images, labels)
    return Source(FASHION_MNIST, list(FASHION_MNIST_CLASSES), 1, splits)


def load_source(
    name: str, input_dir: str | Path | None, val_fraction: float = 0.2, seed: int = 0
) -> Source:
    """Dispatch on the `--source` name of an in-memory source (an image folder is written
    file by file: :func:`ssl_dist.data.prepare.prepare_imagefolder`)."""
    if name == "digits":
        return digits(val_fraction, seed)
    if name == FASHION_MNIST:
        return fashion_mnist(Path(input_dir) if input_dir else None)
    raise ConfigError(f"unknown source {name!r}: choose digits, fashion-mnist or imagefolder")
