"""The `ssl-dist` command.

Exit codes: 0 ok; 2 bad input or config (one message, no traceback); 1 a run that failed; 3
another retrain holds the lock.

Each command imports what it runs when it runs: those modules load torch, Ray or MLflow (seconds
to tens of seconds), and ``ssl-dist --help`` or a bad option should answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from tqdm import tqdm

from ssl_dist.bench.cli import OverrideOpt, bench_app
from ssl_dist.config import ConfigError, load_config, to_yaml
from ssl_dist.retrain_lock import LockHeld
from ssl_dist.submit import register as register_submit

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distributed self-supervised pretraining of vision encoders.",
)
data_app = typer.Typer(no_args_is_help=True, help="Prepare, verify and stream WebDataset shards.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML recipe.")]


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
    seed: Annotated[int, typer.Option(help="Seed of the split, the order and the stats.")] = 0,
    workers: Annotated[
        int, typer.Option(help="imagefolder: processes writing shards; 0: every core.")
    ] = 0,
    max_side: Annotated[
        int,
        typer.Option(help="imagefolder: shrink images longer than this (JPEG q95); 0: never."),
    ] = 0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="imagefolder: write shards as Ray tasks on this cluster (auto, ray://...; "
            "local: a local instance); input and --out must be at the same path on every node."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace shards in a non-empty --out.")] = False,
) -> None:
    """Write a source as WebDataset shards with a manifest (atomically, manifest last).
    An image folder keeps each file's own bytes, in a seeded order, written in parallel."""
    # heavy: the data modules load torch
    from ssl_dist.data.prepare import prepare_imagefolder
    from ssl_dist.data.shards import check_output_dir, write_shards
    from ssl_dist.data.sources import load_source

    check_output_dir(out, overwrite)
    bars: list[tqdm] = []

    def ray_tasks(tasks: list):
        """Shard tasks as Ray tasks, one CPU each; results in task order."""
        import ray  # heavy (seconds): only with --ray-address

        from ssl_dist.data.folder import write_shard

        if not ray.is_initialized():
            address = None if ray_address == "local" else ray_address
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=1, max_retries=2)(write_shard)
        refs = [remote.remote(t) for t in tasks]
        try:
            for ref in refs:
                yield ray.get(ref)
        finally:  # on an error: stop the others and wait for them before the clean-up
            for ref in refs:
                ray.cancel(ref)
            ray.wait(refs, num_returns=len(refs), timeout=60)

    def on_plan(n: int) -> None:  # the bar shows once the input is known to be usable
        bars.append(tqdm(total=n, unit="img", desc="prepare", file=sys.stderr, mininterval=0.5))

    start = time.perf_counter()
    try:
        if source == "imagefolder":
            if input is None:
                raise ConfigError("--source imagefolder needs --input DIR")
            manifest = prepare_imagefolder(
                input,
                out,
                samples_per_shard,
                seed,
                val_fraction,
                workers=workers,
                max_side=max_side,
                overwrite=overwrite,
                progress=lambda n: bars[0].update(n),
                on_plan=on_plan,
                run_tasks=ray_tasks if ray_address else None,
            )
        else:
            if max_side or ray_address:
                raise ConfigError("--max-side and --ray-address apply to imagefolder only")
            src = load_source(source, input, val_fraction, seed)
            on_plan(sum(len(s) for s in src.splits.values()))
            manifest = write_shards(src, out, samples_per_shard, seed, overwrite, bars[0].update)
    finally:
        for bar in bars:
            bar.close()
    secs = time.perf_counter() - start
    total = sum(s.samples for s in manifest.splits.values()) + manifest.skipped_count
    for name, split in manifest.splits.items():
        codecs = ", ".join(split.codecs)
        typer.echo(f"{name}: {split.samples} samples in {len(split.shards)} shards ({codecs})")
    if manifest.skipped_count:
        first = manifest.skipped[0]
        typer.echo(
            f"skipped {manifest.skipped_count} files that do not open (listed in the manifest; "
            f"first: {first.path}: {first.reason})"
        )
    typer.echo(f"wrote {out / 'manifest.json'} ({total / secs:.0f} images/s)")


@data_app.command("verify")
def data_verify(directory: Annotated[Path, typer.Argument(help="Shard directory.")]) -> None:
    """Check every shard's size and checksum, decode every sample and flag members whose
    decoders would unpickle them; exit 1 with one line per problem."""
    from ssl_dist.data.shards import verify  # heavy: loads torch

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
    from ssl_dist.data.stream import stream  # heavy: loads torch

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
        f"{st.lost} lost, {st.repeats} top-up repeats, "
        f"batch shape {tuple(batch.eval_images().shape) if st.batches else None}"
    )
    for line in st.report():
        typer.echo(f"damaged {line}")


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
    from ssl_dist.train.driver import pretrain as run  # heavy: torch, MLflow and Ray

    path, metrics = run(cfg)
    if metrics.get("images_s"):
        typer.echo(
            f"steps: {metrics['step']}, {metrics['images_s']:.0f} images/s "
            f"({metrics['step_ms']:.0f} ms/step after warm-up), "
            f"peak RSS {metrics['peak_rss_mb']:.0f} MiB per rank"
        )
    typer.echo(f"checkpoint: {path}")
    _echo_mlflow(metrics.get("mlflow"), cfg)


def _echo_mlflow(logged: dict | None, cfg) -> None:
    from ssl_dist.tracking import resolve_uri, ui_command  # heavy: loads torch

    if not cfg.tracking.enabled:
        return
    uri = resolve_uri(
        cfg.tracking.uri,
        str(Path(cfg.run.storage_path).resolve())
        if "://" not in cfg.run.storage_path
        else cfg.run.storage_path,
    )
    if not logged:
        typer.echo(f"mlflow: nothing logged at {uri} (see the warnings above)")
    elif "version" in logged:
        typer.echo(f"mlflow run: {logged['run_id']}")
        typer.echo(f"registered: {logged['registered']} (version {logged['version']})")
        typer.echo(f"mlflow ui: {ui_command(uri, logged['run_id'])}")
    else:
        typer.echo(f"mlflow run: {logged['run_id']} (paused at step {logged['paused_at_step']})")


@app.command("retrain")
def retrain(
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    data: Annotated[
        str | None, typer.Option(help="Newest data: a manifest or a glob (sets retrain.data).")
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="Fixed evaluation shards (sets retrain.eval_data).")
    ] = None,
    margin: Annotated[float | None, typer.Option(help="Sets retrain.margin.")] = None,
    from_scratch: Annotated[bool, typer.Option(help="Do not warm-start.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the decision as JSON here.")] = None,
) -> None:
    """Scheduled retraining: champion vs a challenger trained on the newest data.

    Pretrains a challenger on the newest data (warm-started from the champion), probes both
    on the fixed eval shards, and moves the champion alias only if the challenger wins by the
    margin. Exit 3 when another retrain holds the lock."""
    extra = [f"retrain.data={data}"] if data else []
    extra += [f"retrain.eval_data={eval_data}"] if eval_data else []
    extra += [f"retrain.margin={margin}"] if margin is not None else []
    extra += ["retrain.warm_start=false"] if from_scratch else []
    cfg = load_config(config, [*(override or []), *extra])
    from ssl_dist.retrain import retrain as run  # heavy: torch, MLflow and Ray

    result = run(cfg, log=lambda line: typer.echo(f"retrain: {line}"))
    typer.echo(f"decision: {result.decision} ({result.reason})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.to_json() + "\n")


@app.command("knn")
def knn(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint dir (has encoder.safetensors).")],
    manifest: Annotated[str | None, typer.Option(help="Shards to evaluate on instead.")] = None,
) -> None:
    """kNN accuracy (val split, train split as bank) of a checkpoint's encoder vs its init."""
    from ssl_dist.evaluate.knn import checkpoint_knn  # heavy: loads torch

    r = checkpoint_knn(checkpoint, manifest)
    typer.echo(
        f"kNN top-1 on val: {r['knn_trained']:.1%} pretrained vs {r['knn_init']:.1%} at init"
    )


@app.command("finetune")
def finetune(
    model: Annotated[
        str,
        typer.Option(
            help="models:/name@alias, models:/name/VERSION, runs:/RUN_ID/PATH or a checkpoint dir."
        ),
    ],
    data: Annotated[str, typer.Option(help="Shard dir with manifest.json (train + val).")],
    mode: Annotated[
        str,
        typer.Option(
            help="linear: probe frozen features | full: fine-tune encoder + head on Ray workers."
        ),
    ],
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="full: passes over train.")] = 5,
    lr: Annotated[float, typer.Option(help="full: peak SGD learning rate.")] = 0.1,
    batch_size: Annotated[
        int | None,
        typer.Option(help="full: images per worker per step (default: the pretraining one)."),
    ] = None,
    num_workers: Annotated[
        int | None, typer.Option(help="full: Ray Train workers (default: the pretraining one).")
    ] = None,
    storage_path: Annotated[str, typer.Option(help="full: where Ray keeps the run.")] = (
        "work/runs"
    ),
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """Linear probe or full fine-tune of a pretrained encoder (models:/... or a checkpoint).

    Evaluate a pretrained encoder on labelled shards: a linear probe on frozen features
    (L2 penalty chosen on held-out train) or full fine-tuning through DeepSpeed; top-1/top-5 on
    val, logged to MLflow (experiment ssl-dist-finetune) with tags linking the source model.

    Weights are read from encoder.safetensors only; pickled weights are refused (exit 2)."""
    from ssl_dist.evaluate.finetune import run_finetune, summary  # heavy: torch, MLflow, Ray

    r = run_finetune(
        model,
        data,
        mode,
        tracking_uri,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        num_workers=num_workers,
        storage_path=storage_path,
    )
    typer.echo(summary(r))
    if r.get("checkpoint"):
        typer.echo(f"checkpoint: {r['checkpoint']}")
    typer.echo(f"mlflow run: {r['mlflow_run_id'] or 'not logged (see the warning above)'}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2, default=str) + "\n")


register_submit(app)


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
    except Exception as e:
        if isinstance(e, click.ClickException):  # usage errors carry their own exit code 2
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, LockHeld):
            typer.echo(f"error: {e}", err=True)
            sys.exit(3)
        if os.environ.get("SSL_DIST_DEBUG"):
            raise
        typer.echo(f"failed: {type(e).__name__}: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
