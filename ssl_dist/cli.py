"""The `ssl-dist` command.

Exit codes: 0 ok; 2 bad input or config (one message, no traceback); 1 a run that failed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ssl_dist.config import ConfigError, load_config, to_yaml

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distributed self-supervised pretraining of vision encoders.",
)
data_app = typer.Typer(no_args_is_help=True, help="Prepare, verify and stream WebDataset shards.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table and write JSON.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML recipe.")]
OverrideOpt = Annotated[
    list[str] | None, typer.Option("--override", "-o", help="Dotted override, e.g. optim.lr=0.3.")
]


@data_app.command("prepare")
def data_prepare(
    source: Annotated[str, typer.Option(help="digits | fashion-mnist | imagefolder")],
    out: Annotated[Path, typer.Option(help="Output directory for shards + manifest.json.")],
    input: Annotated[
        Path | None, typer.Option(help="Input dir (imagefolder, fashion-mnist).")
    ] = None,
    samples_per_shard: Annotated[int, typer.Option(help="Samples per tar shard.")] = 1000,
    val_fraction: Annotated[
        float, typer.Option(help="Val share when the source has no split.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace shards in a non-empty --out.")] = False,
) -> None:
    """Write a source as WebDataset shards with a manifest (atomically, manifest last)."""
    from tqdm import tqdm

    from ssl_dist.data.shards import check_output_dir, write_shards
    from ssl_dist.data.sources import load_source

    check_output_dir(out, overwrite)
    src = load_source(source, input, val_fraction, seed)
    total = sum(len(s) for s in src.splits.values())
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc="prepare", file=sys.stderr, mininterval=0.5) as bar:
        manifest = write_shards(src, out, samples_per_shard, seed, overwrite, bar.update)
    secs = time.perf_counter() - start
    for name, split in manifest.splits.items():
        typer.echo(f"{name}: {split.samples} samples in {len(split.shards)} shards")
    typer.echo(f"wrote {out / 'manifest.json'} ({total / secs:.0f} images/s)")


@data_app.command("verify")
def data_verify(directory: Annotated[Path, typer.Argument(help="Shard directory.")]) -> None:
    """Check every shard's checksum and decode every sample; exit 1 naming bad shards."""
    from ssl_dist.data.shards import verify

    problems = verify(directory)
    for p in problems:
        typer.echo(f"BAD {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: every shard in {directory} matches its manifest")


@data_app.command("stream")
def data_stream(
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    rank: Annotated[int, typer.Option(help="Rank to stream as.")] = 0,
    world_size: Annotated[int, typer.Option(help="World size to split for.")] = 1,
    epoch: Annotated[int, typer.Option(help="Epoch (changes the shard order).")] = 0,
) -> None:
    """Stream one epoch of one rank's batches, with progress and throughput."""
    from tqdm import tqdm

    from ssl_dist.data.stream import stream

    cfg = load_config(config, override)
    s = stream(cfg.data, rank, world_size, epoch, cfg.run.seed)
    with tqdm(total=len(s), unit="batch", desc=f"rank {rank}", file=sys.stderr) as bar:
        for batch in s:  # noqa: B007 (the last batch's shape is reported)
            bar.update(1)
            bar.set_postfix(img_s=f"{s.stats.samples / max(s.stats.seconds, 1e-9):.0f}")
    st = s.stats
    typer.echo(
        f"streamed {st.batches} batches / {st.samples} images in {st.seconds:.2f}s: "
        f"{st.samples / max(st.seconds, 1e-9):.0f} images/s, {st.skipped} skipped, "
        f"batch shape {tuple(batch.images.shape) if st.batches else None}"
    )


@app.command("pretrain")
def pretrain(
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print and exit.")] = False,
) -> None:
    """Pretrain an encoder (Ray Train workers, DeepSpeed ZeRO)."""
    cfg = load_config(config, override)
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return
    from ssl_dist.train.driver import pretrain as run

    path, metrics = run(cfg)
    if metrics.get("images_s"):
        typer.echo(
            f"steps: {metrics['step']}, {metrics['images_s']:.0f} images/s "
            f"({metrics['step_ms']:.0f} ms/step after warm-up), "
            f"peak RSS {metrics['peak_rss_mb']:.0f} MiB per rank"
        )
    typer.echo(f"checkpoint: {path}")


@app.command("knn")
def knn(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint dir (has encoder.safetensors).")],
    manifest: Annotated[str | None, typer.Option(help="Shards to evaluate on instead.")] = None,
) -> None:
    """kNN accuracy (val split, train split as bank) of a checkpoint's encoder vs its init."""
    from ssl_dist.evaluate.knn import checkpoint_knn

    r = checkpoint_knn(checkpoint, manifest)
    typer.echo(
        f"kNN top-1 on val: {r['knn_trained']:.1%} pretrained vs {r['knn_init']:.1%} at init"
    )


@bench_app.command("loader")
def bench_loader(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path(
        "bench-results/loader.json"
    ),
    work: Annotated[Path, typer.Option(help="Scratch directory.")] = Path("work/bench-loader"),
    source: Annotated[str, typer.Option(help="digits | fashion-mnist")] = "digits",
    image_size: Annotated[int, typer.Option(help="Decode size.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 256,
    seconds: Annotated[float, typer.Option(help="Minimum seconds per measurement.")] = 3.0,
) -> None:
    """Stream vs per-file PNG Dataset vs raw tar read rate; kornia vs torchvision views."""
    from ssl_dist.bench.loader import run

    run(out=out, work=work, source=source, image_size=image_size, batch_size=batch_size,
        seconds=seconds)  # fmt: skip


@bench_app.command("loss")
def bench_loss(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-results/loss.json"),
    seconds: Annotated[float, typer.Option(help="Minimum seconds per measurement.")] = 2.0,
) -> None:
    """NT-Xent with gathered vs local negatives; forward+backward images/s per method."""
    from ssl_dist.bench.loss import run

    run(out=out, seconds=seconds)


@bench_app.command("train")
def bench_train(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path(
        "bench-results/train.json"
    ),
    work: Annotated[Path, typer.Option(help="Scratch directory.")] = Path("work/bench-train"),
    steps: Annotated[int, typer.Option(help="Steps per run (5 are warm-up).")] = 30,
    global_batch: Annotated[int, typer.Option(help="Global batch of every run.")] = 128,
) -> None:
    """Plain torch loop vs Ray 1/2 workers vs ZeRO 0-3: images/s, scaling, memory per rank."""
    from ssl_dist.bench.train import run

    run(out=out, work=work, steps=steps, global_batch=global_batch)


def main() -> None:
    logging.basicConfig(level=os.environ.get("SSL_DIST_LOG", "WARNING"), format="%(message)s")
    try:
        # Without standalone mode click returns an Exit's code instead of raising it.
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors carry their own exit code 2
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("SSL_DIST_DEBUG"):
            raise
        typer.echo(f"failed: {type(e).__name__}: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
