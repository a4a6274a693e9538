"""`ssl-dist bench ...`: the benchmark commands (each prints a table and writes JSON). Added to
the `ssl-dist` app by :mod:`ssl_dist.cli`; like every command, each imports what it runs when
it runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ssl_dist.config import ConfigError, load_config

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table and write JSON.")
OverrideOpt = Annotated[
    list[str] | None, typer.Option("--override", "-o", help="Dotted override, e.g. optim.lr=0.3.")
]


@bench_app.command("loader")
def bench_loader(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path(
        "bench-results/loader.json"
    ),
    work: Annotated[Path, typer.Option(help="Scratch directory.")] = Path("work/bench-loader"),
    source: Annotated[
        str,
        typer.Option(
            help="digits | fashion-mnist | folder (bench prepare's JPEG folder and its shards)."
        ),
    ] = "digits",
    image_size: Annotated[int, typer.Option(help="Decode size.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 256,
    seconds: Annotated[float, typer.Option(help="Minimum seconds per measurement.")] = 3.0,
    images: Annotated[
        int, typer.Option(help="folder: files in the generated folder (0: bench prepare's 20000).")
    ] = 0,
    folder_work: Annotated[
        Path, typer.Option(help="folder: bench prepare's --work (folder and shards, cached).")
    ] = Path("work/bench-prepare"),
    consumer: Annotated[
        str,
        typer.Option(
            help="Recipe whose one training worker's images/s the loaders are compared with "
            "('' to skip)."
        ),
    ] = "launch/recipes/fashion-mnist-cpu.yaml",
) -> None:
    """Stream vs per-file Dataset (PNG files, or for folder ImageFolder + RandomResizedCrop)
    vs raw tar read rate; kornia vs torchvision views; against one training worker's intake."""
    from ssl_dist.bench.loader import run  # heavy: loads torch

    run(
        out=out,
        work=work,
        source=source,
        image_size=image_size,
        batch_size=batch_size,
        seconds=seconds,
        images=images,
        folder_work=folder_work,
        consumer=consumer,
    )


@bench_app.command("prepare")
def bench_prepare(
    images: Annotated[int, typer.Option(help="Files in the generated folder (10% val).")] = 20000,
    work: Annotated[
        Path, typer.Option(help="Scratch dir: the generated folder (cached) and its shards.")
    ] = Path("work/bench-prepare"),
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path(
        "bench-results/prepare.json"
    ),
    png_images: Annotated[
        int, typer.Option(help="Files the decode + PNG re-encode writer is timed on.")
    ] = 2000,
    repeats: Annotated[
        int, typer.Option(help="Runs of each writer; the fastest is reported, with the spread.")
    ] = 3,
) -> None:
    """data prepare's images/s at 1 and all cores vs the raw tar limit and a decode + PNG
    writer, on a generated JPEG folder; bytes written vs the input's."""
    from ssl_dist.bench.prepare import run  # heavy: loads torch

    run(out=out, work=work, images=images, png_images=png_images, repeats=repeats)


@bench_app.command("loss")
def bench_loss(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-results/loss.json"),
    seconds: Annotated[float, typer.Option(help="Minimum seconds per measurement.")] = 2.0,
) -> None:
    """NT-Xent with gathered vs local negatives; forward+backward images/s per method."""
    from ssl_dist.bench.loss import run  # heavy: loads torch

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
    from ssl_dist.bench.train import run  # heavy: loads torch

    run(out=out, work=work, steps=steps, global_batch=global_batch)


FASHION_RECIPE = Path("launch/recipes/fashion-mnist-cpu.yaml")
FASHION_MNIST_IDX = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's `dataset-fashion-mnist` puts the IDX files (ssl_dist.data.sources too)."""
RecipeOpt = Annotated[Path, typer.Option("--config", "-c", help="Recipe.")]
IdxDirOpt = Annotated[Path, typer.Option(help="Directory with the Fashion-MNIST IDX files.")]
BenchWorkOpt = Annotated[
    Path, typer.Option(help="Scratch dir: cached shards (shared by quality and scaling), runs.")
]


@bench_app.command("quality")
def bench_quality(
    budget_min: Annotated[
        float, typer.Option(help="Wall-clock minutes of pretraining (and of the supervised run).")
    ] = 15.0,
    method: Annotated[
        str,
        typer.Option(
            help="A method, a comma-separated list, or all (every method for the recipe's "
            "ResNet: simclr,moco_v2,moco_v3,byol,rotation,simmim,dino); each pretrains for the "
            "budget in turn."
        ),
    ] = "simclr",
    out: Annotated[Path, typer.Option(help="JSON results; the plot goes beside it (.png).")] = Path(
        "bench-results/quality.json"
    ),
    work: BenchWorkOpt = Path("work/bench-quality"),
    config: RecipeOpt = FASHION_RECIPE,
    override: OverrideOpt = None,
    input: IdxDirOpt = FASHION_MNIST_IDX,
    supervised: Annotated[
        bool, typer.Option(help="Also train the supervised reference (same budget).")
    ] = True,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite work/runs)."),
    ] = None,
    checkpoints: Annotated[
        int, typer.Option(min=1, help="Probe points per run after random init (~1 min each).")
    ] = 4,
    eval_threads: Annotated[
        int, typer.Option(min=1, help="Threads for the probes (they run after pretraining).")
    ] = 1,
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Runs of the best method, each with its own seed (run.seed, +1, ...): 2 or more "
            "reports the spread between seeds; 1 skips the extra budget.",
        ),
    ] = 2,
    holdout: Annotated[
        int,
        typer.Option(
            min=0,
            help="For tuning: score on the last N train images (pretraining and probes train on "
            "the rest) and never read the official test set; 0 scores on the test set.",
        ),
    ] = 0,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the bench whose journal is in --work (same settings): what it "
            "finished (runs, probes, the supervised reference) is not run again. The journal "
            "file alone carries a bench to another machine (copy it into the new --work).",
        ),
    ] = False,
) -> None:
    """Fashion-MNIST representation quality in a wall-clock budget vs pixels, init, supervised.

    Pretrains on Ray workers for a wall-clock budget, then linear probe + kNN on the official
    test set at every checkpoint, against raw pixels, random init and a supervised run of the
    same budget. Table, JSON, PNG, MLflow.

    Needs Debian's dataset-fashion-mnist (exit 2 naming it when missing). The whole bench takes
    about (methods + 2) x (budget + 2 min) + methods x checkpoints x 2 min on a 2-core CPU
    (pretraining and calibration, the best method's second seed, supervised, probes): 3.5 hours
    for all methods at 15 minutes. --resume continues one that was cut short."""
    from ssl_dist.bench.quality import KNOWN, METHODS, run  # heavy: torch, MLflow and Ray

    names = {"all": METHODS, "both": ("simclr", "moco_v3")}.get(method, method.split(","))
    unknown = [m for m in names if m not in KNOWN]
    if unknown or not names:
        raise ConfigError(
            f"--method: unknown {unknown or method!r}; choose from {', '.join(KNOWN)}, all, "
            "or a comma-separated list"
        )
    os.environ.setdefault("SSL_DIST_NO_PROGRESS", "1")
    run(
        out=out,
        work=work,
        budget_min=budget_min,
        methods=tuple(dict.fromkeys(names)),
        recipe=config,
        input_dir=input,
        overrides=override or [],
        supervised=supervised,
        tracking_uri=tracking_uri,
        checkpoints=checkpoints,
        eval_threads=eval_threads,
        seeds=seeds,
        holdout=holdout,
        resume=resume,
    )


@bench_app.command("efficiency")
def bench_efficiency(
    config: RecipeOpt = FASHION_RECIPE,
    override: OverrideOpt = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per variant.")] = 30,
    warmup: Annotated[
        int, typer.Option(min=1, help="Untimed steps first (compilation happens there).")
    ] = 5,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="Variants to run (repeat the option): eager, channels_last, compile, "
            "compile+channels_last, bf16; default all."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path(
        "bench-results/efficiency.json"
    ),
) -> None:
    """One training worker's images/s per change that can make a step cheaper, in one run.

    The recipe (default the Fashion-MNIST CPU one; its shards must exist, see its header) trains
    in this process on cpus_per_worker threads, as one Ray worker does on its core: eager, then
    channels-last, torch.compile, both, and bf16 autocast where the CPU has native bf16."""
    from ssl_dist.bench.efficiency import VARIANTS, run  # heavy: torch

    os.environ.setdefault("SSL_DIST_NO_PROGRESS", "1")
    run(load_config(config, override or []), out, steps, warmup, variant or VARIANTS)


@bench_app.command("scaling")
def bench_scaling(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path(
        "bench-results/scaling.json"
    ),
    work: BenchWorkOpt = Path("work/bench-quality"),
    config: RecipeOpt = FASHION_RECIPE,
    override: OverrideOpt = None,
    input: IdxDirOpt = FASHION_MNIST_IDX,
    steps: Annotated[int, typer.Option(help="Timed steps per run (after 5 warm-up).")] = 30,
    phase_steps: Annotated[
        int, typer.Option(help="Timed steps of the instrumented phase loop.")
    ] = 20,
    cluster: Annotated[
        bool, typer.Option(help="Also run 2 workers on a local 2-node Ray cluster.")
    ] = True,
) -> None:
    """Fashion-MNIST recipe throughput: 1-2 workers, 2 nodes, bare loop, step shares, FLOP/s.

    Images/s with 1 and 2 Ray workers and across 2 local Ray nodes, against a bare PyTorch
    loop; step-time shares (data, augmentation, all-gather, forward/backward, all-reduce);
    model FLOPs and achieved FLOP/s against the measured matmul peak. Table + JSON."""
    from ssl_dist.bench.scaling import run  # heavy: torch and Ray

    os.environ.setdefault("SSL_DIST_NO_PROGRESS", "1")
    run(
        out=out,
        work=work,
        recipe=config,
        input_dir=input,
        steps=steps,
        phase_steps=phase_steps,
        overrides=override or [],
        cluster=cluster,
    )
