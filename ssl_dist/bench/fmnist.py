"""The benches' Fashion-MNIST: Debian's ``dataset-fashion-mnist`` IDX files checked (exit 2 naming
what is missing) and written once as shards in a bench's work dir (the official 10k test set is
the manifest's ``val`` split)."""

from __future__ import annotations

from pathlib import Path

import typer

from ssl_dist.config import ConfigError
from ssl_dist.data.shards import MANIFEST, read_manifest, write_shards
from ssl_dist.data.sources import FASHION_MNIST, fashion_mnist, holdout, holdout_name

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def missing_idx(root: Path) -> list[str]:
    """Fashion-MNIST IDX files (plain or .gz) not found in `root`."""
    return [n for n in IDX_FILES if not any((root / f"{n}{s}").is_file() for s in ("", ".gz"))]


def require_fashion_mnist(root: Path) -> None:
    """Exit 2 with one line when the IDX files are missing (nothing is installed)."""
    missing = missing_idx(root)
    if missing:
        typer.echo(
            f"error: Fashion-MNIST not found in {root} (missing {', '.join(missing)}): "
            "install it with `sudo apt-get install dataset-fashion-mnist`, or pass --input DIR",
            err=True,
        )
        raise typer.Exit(2)


def prepare_shards(
    work: Path, root: Path, samples_per_shard: int = 1000, holdout_n: int = 0
) -> Path:
    """Fashion-MNIST as shards under ``work/data`` (written once, reused while complete).

    `holdout_n` > 0: for tuning, the last `holdout_n` train images are the ``val`` split and the
    official test set is not written (``work/data-holdout<N>``)."""
    out = work / (f"data-holdout{holdout_n}" if holdout_n else "data")
    name = holdout_name(FASHION_MNIST, holdout_n) if holdout_n else FASHION_MNIST
    if (out / MANIFEST).is_file():
        try:
            m = read_manifest(out)
            if m.source == name and set(m.splits) >= {"train", "val"}:
                return (out / MANIFEST).resolve()
        except (ConfigError, ValueError, OSError, KeyError):
            pass
    source = fashion_mnist(root)
    write_shards(
        holdout(source, holdout_n) if holdout_n else source, out, samples_per_shard, overwrite=True
    )
    return (out / MANIFEST).resolve()
