"""A tiny Fashion-MNIST look-alike in IDX format, for the bench tests (the real one is large)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

TINY = [
    "model.widths=[4,8,8,8]",
    "model.proj_hidden=16",
    "model.proj_dim=8",
    "data.batch_size=8",
    "data.shuffle_buffer=8",
]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """Ten classes told apart by which horizontal band is bright, plus noise."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y + 4 : 2 * y + 8] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root
