"""`ssl-dist bench quality`: how good a self-supervised encoder gets on real data in a fixed time.

On Fashion-MNIST (Debian's ``dataset-fashion-mnist`` IDX files; the official 10k test set is the
manifest's ``val`` split), one run:

1. prepares shards once (cached in the work dir);
2. calibrates: a short Ray run of the recipe (same workers, tracking off) measures the step
   time after warm-up and the fixed start-up cost of a run;
3. pretrains with the recipe on Ray workers for ``budget`` wall-clock seconds: ``run.max_steps``
   is set from the calibration (the cosine schedule then ends when the time does) and
   ``run.checkpoint_every`` to a quarter of it, so the probe can be run at four points;
4. trains the same encoder supervised (cross-entropy, linear head, in this process, same
   wall-clock budget, same cores): the upper reference;
5. evaluates, on frozen features of the un-augmented view, with the project's linear probe
   (:func:`ssl_dist.evaluate.finetune.probe_features`: L-BFGS, L2 penalty chosen on a held-out
   20% of train; train 60k, test 10k) and the kNN monitor (k = 20, cosine, whole train split
   as bank): every pretraining checkpoint, the encoder at random init, the supervised encoder,
   and logistic regression on raw pixels (standardised; at 32 px and the recipe's size);
6. prints a table, writes JSON and a PNG (probe accuracy against training time), and logs a run
   to MLflow (experiment ``ssl-dist-bench``; bounded, a tracking failure costs a warning).

Random init is the training init: ``torch.manual_seed(run.seed)`` then the method's constructor
(:func:`ssl_dist.train.parts.build_model`), so with the recipe's ``model.zero_init_residual:
true`` every residual block starts as the identity (last BN gamma = 0) and the random encoder is
the stem plus the strided 1x1 shortcuts. The supervised run starts from the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
import typer
from torch import Tensor, nn

from ssl_dist import tracking
from ssl_dist.artifact import read_artifact
from ssl_dist.atomic import write_atomic
from ssl_dist.bench.report import table, torch_threads, write
from ssl_dist.config import Config, ConfigError, DataConfig, load_config
from ssl_dist.data.shards import MANIFEST, manifest_sha256, read_manifest, write_shards
from ssl_dist.data.sources import FASHION_MNIST_DIR, fashion_mnist
from ssl_dist.data.stream import open_shards, stream
from ssl_dist.data.views import views_for
from ssl_dist.evaluate.knn import knn_predict
from ssl_dist.evaluate.probe import WD_GRID, probe_features
from ssl_dist.evaluate.source import DEFAULT_STORAGE
from ssl_dist.methods.classify import Classifier, ClassifyInputs
from ssl_dist.optim import param_groups
from ssl_dist.train.checkpoint import STATE, TrainState, is_complete
from ssl_dist.train.driver import build_trainer, connect, pretrain, resolve_paths
from ssl_dist.train.parts import build_model, plan_steps, view_seed
from ssl_dist.train.runtime import Position, Recorder, Schedule, TimeLimit, TorchBackend, run_steps

RECIPE = Path("launch/recipes/fashion-mnist-cpu.yaml")
METHODS = ("simclr", "moco_v3")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CHECKPOINTS = 4
"""Pretraining checkpoints per run (the probe curve's points after random init)."""
CALIBRATION_STEPS = 12
"""Steps of the calibration run: 5 warm-up steps (not timed by the loop) + 7 timed."""
CHECKPOINT_S = 1.5
"""Allowance per extra checkpoint when planning steps (DeepSpeed save + Ray persist)."""
FINAL_SAVE_S = 5.0
"""Seconds kept back from the budget for the last step and checkpoint after the time limit."""
EVAL_BATCH = 500
EXPERIMENT = "ssl-dist-bench"
COLUMNS = ["encoder", "method", "train_s", "step", "epochs", "probe_top1", "knn_top1",
           "probe_wd", "vs_raw", "vs_init"]  # fmt: skip


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


def prepare_shards(work: Path, root: Path, samples_per_shard: int = 1000) -> Path:
    """Fashion-MNIST as shards under ``work/data`` (written once, reused while complete)."""
    out = work / "data"
    if (out / MANIFEST).is_file():
        try:
            m = read_manifest(out)
            if m.source == "fashion-mnist" and set(m.splits) >= {"train", "val"}:
                return (out / MANIFEST).resolve()
        except (ConfigError, ValueError, OSError, KeyError):
            pass
    write_shards(fashion_mnist(root), out, samples_per_shard, overwrite=True)
    return (out / MANIFEST).resolve()


# ---------------------------------------------------------------- evaluation


@dataclass
class Labelled:
    images: Tensor
    """uint8 ``[N, C, H, W]`` at the recipe's image size (decoded as the stream decodes)."""
    labels: Tensor


def load_split(data: DataConfig, split: str) -> Labelled:
    """Every sample of `split`, decoded once into memory (Fashion-MNIST: 55 MB at 28 px)."""
    xs, ys = [], []
    cfg = data.model_copy(update={"batch_size": 1000})
    for batch in stream(cfg, 0, 1, 0, split=split, partial=True):
        xs.append(batch.images)
        ys.append(batch.labels)
    if not ys:
        raise ConfigError(f"split {split!r} of {data.manifest} is empty")
    return Labelled(torch.cat(xs), torch.cat(ys))


@torch.no_grad()
def encode(encoder: nn.Module, images: Tensor, views: Any, batch: int = EVAL_BATCH) -> Tensor:
    """Frozen features of the un-augmented view (``views.plain``), BN in eval mode."""
    was = encoder.training
    encoder.eval()
    try:
        return torch.cat([encoder(views.plain(x)).float() for x in images.split(batch)])
    finally:
        encoder.train(was)


def raw_pixels(images: Tensor, views: Any, size: int | None = None) -> Tensor:
    """Raw pixels, normalised like the encoder's input (optionally resized), flattened."""
    x = views.plain(images)
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.flatten(1)


def evaluate_features(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
    max_iter: int = 300,
) -> dict[str, Any]:  # fmt: skip
    """The project's linear probe and the kNN monitor on the same features."""
    start = time.perf_counter()
    r = probe_features(train_x, train_y, val_x, val_y, num_classes, max_iter=max_iter)
    probe_s = time.perf_counter() - start
    knn = knn_predict(train_x, train_y, val_x, num_classes).argmax(1)
    return {"probe_top1": r["top1"], "probe_top5": r["top5"], "probe_wd": r["weight_decay"],
            "knn_top1": (knn == val_y).float().mean().item(), "feature_dim": r["feature_dim"],
            "probe_s": probe_s}  # fmt: skip


class Evaluator:
    """Holds the labelled splits and the plain view; scores encoders and raw pixels.

    With `cache_dir`, the two baselines that do not depend on training (raw pixels, random
    init) are kept in ``baselines.json`` keyed by the manifest digest and everything that
    determines them, and reused by later runs (marked ``cached``)."""

    def __init__(self, cfg: Config, threads: int = 1, cache_dir: Path | None = None) -> None:
        self.cfg = cfg
        shards = open_shards(cfg.data)
        self.manifest_sha256 = manifest_sha256(cfg.data.manifest)
        self.num_classes = len(shards.manifest.classes)
        self.views = views_for(cfg, shards.manifest)
        self.threads = threads
        self.cache = cache_dir / "baselines.json" if cache_dir is not None else None
        start = time.perf_counter()
        self.train = load_split(cfg.data, cfg.data.split)
        self.val = load_split(cfg.data, cfg.data.val_split)
        self.load_s = time.perf_counter() - start

    def _score(self, train_x: Tensor, val_x: Tensor) -> dict[str, Any]:
        return evaluate_features(train_x, self.train.labels, val_x, self.val.labels,
                                 self.num_classes)  # fmt: skip

    def encoder(self, encoder: nn.Module) -> dict[str, Any]:
        with torch_threads(self.threads):
            start = time.perf_counter()
            tx = encode(encoder, self.train.images, self.views)
            vx = encode(encoder, self.val.images, self.views)
            encode_s = time.perf_counter() - start
            return {**self._score(tx, vx), "encode_s": encode_s}

    def pixels(self, size: int | None = None) -> dict[str, Any]:
        def score() -> dict[str, Any]:
            with torch_threads(self.threads):
                tx = raw_pixels(self.train.images, self.views, size)
                vx = raw_pixels(self.val.images, self.views, size)
                return self._score(tx, vx)

        return self._cached({"kind": "raw", "size": size or self.cfg.data.image_size}, score)

    def random_init(self) -> dict[str, Any]:
        key = {"kind": "init", "model": self.cfg.model.model_dump(mode="json"),
               "method": self.cfg.method.name, "seed": self.cfg.run.seed,
               "size": self.cfg.data.image_size, "channels": self.cfg.data.channels}  # fmt: skip
        return self._cached(key, lambda: self.encoder(init_encoder(self.cfg)))

    def _cached(self, key: dict[str, Any], score: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.cache is None:
            return score()
        full = {**key, "manifest": self.manifest_sha256, "wd_grid": list(WD_GRID),
                "view": self.cfg.views.normalize}  # fmt: skip
        digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]
        try:
            saved = json.loads(self.cache.read_text())
        except (OSError, ValueError):
            saved = {}
        if digest in saved:
            return {**saved[digest], "cached": True}
        result = score()
        saved[digest] = result
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.cache, json.dumps(saved, indent=1))
        return result


def init_encoder(cfg: Config) -> nn.Module:
    """The encoder exactly as training starts it (seed, method constructor, zero-init)."""
    return build_model(cfg).encoder


def checkpoint_encoder(directory: Path) -> nn.Module:
    """The encoder of a checkpoint (its artifact)."""
    return read_artifact(directory).build_encoder()


# ---------------------------------------------------------------- pretraining on a time budget


def bench_config(
    recipe: Path,
    manifest: Path,
    work: Path,
    method: str,
    name: str,
    overrides: Sequence[str] = (),
    tracking_uri: str | None = None,
) -> Config:
    """The recipe on the prepared shards, with this run's storage, name and tracking URI."""
    cfg = load_config(recipe, [f"data.manifest={manifest}", f"method.name={method}",
                               f"run.storage_path={(work / 'runs').resolve()}", f"run.name={name}",
                               "tracking.knn_every_epochs=0", *overrides])  # fmt: skip
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    return cfg


@dataclass
class Calibration:
    step_s: float
    """Seconds per optimizer step after warm-up (the loop's own steady-state clock)."""
    startup_s: float
    """Seconds of a run outside its timed steps: worker start, warm-up, checkpoint, teardown."""
    wall_s: float
    steps: int


def calibrate(cfg: Config, steps: int = CALIBRATION_STEPS) -> Calibration:
    """A short Ray run of `cfg` (tracking off, its own run name)."""
    c = cfg.model_copy(deep=True)
    c.tracking.enabled = False
    c.run.name = f"{cfg.run.name}-calibration"
    c.run.max_steps, c.run.checkpoint_every, c.run.log_every = steps, steps, steps
    c = resolve_paths(c)
    connect(c)
    start = time.perf_counter()
    metrics = build_trainer(c).fit().metrics or {}
    wall = time.perf_counter() - start
    step_s = float(metrics.get("step_ms", 0.0)) / 1e3
    if step_s <= 0:
        raise RuntimeError(f"calibration run reported no step time: {metrics}")
    return Calibration(step_s, max(0.0, wall - steps * step_s), wall, steps)


def plan_budget(
    budget_s: float, cal: Calibration, checkpoints: int = CHECKPOINTS
) -> tuple[int, int]:
    """``(max_steps, checkpoint_every)`` so that a run takes about `budget_s` wall-clock."""
    usable = budget_s - cal.startup_s - CHECKPOINT_S * (checkpoints - 1)
    steps = max(checkpoints, int(usable / cal.step_s))
    every = max(1, math.ceil(steps / checkpoints))
    return steps, every


@dataclass
class Point:
    step: int
    seconds: float
    """Wall-clock seconds from the start of the run to this checkpoint."""
    path: Path | None


@dataclass
class Pretrained:
    method: str
    cfg: Config
    points: list[Point]
    wall_s: float
    metrics: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 0
    epochs: float = 0.0
    stopped: str | None = None
    """Why the run stopped before `max_steps` (its last checkpoint's ``stopped``)."""


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path, float]]:
    """``(step, dir, mtime of its train state)`` of every complete checkpoint, by step."""
    found = []
    for d in run_dir.glob("checkpoint_*"):
        if is_complete(d):
            found.append((TrainState.read(d).step, d, (d / STATE).stat().st_mtime))
    return sorted(found, key=lambda t: t[0])


def pretrain_for(cfg: Config, budget_s: float, cal: Calibration) -> Pretrained:
    """Pretrain `cfg` on Ray for about `budget_s` seconds (through ``ssl-dist pretrain``'s
    driver: MLflow run, checkpoint artifacts, registered encoder)."""
    steps, every = plan_budget(budget_s, cal)
    c = cfg.model_copy(deep=True)
    c.run.max_steps, c.run.checkpoint_every = steps, every
    # The plan usually ends the schedule in time; the limit holds the budget when the
    # calibration was optimistic (a stop then leaves the schedule's tail unrun, reported).
    # A budget too small for the shortest run (start-up plus CHECKPOINTS steps) gets no limit:
    # it runs those steps.
    if steps > CHECKPOINTS:
        c.run.time_limit_s = budget_s - FINAL_SAVE_S
    c.run.num_to_keep = max(c.run.num_to_keep, CHECKPOINTS + 2)
    c.run.epochs = max(c.run.epochs, 10_000)  # max_steps decides
    workers = c.scaling.num_workers
    plan = plan_steps(c, open_shards(c.data), workers if isinstance(workers, int) else workers[0])
    start_wall = time.time()
    start = time.perf_counter()
    _, metrics = pretrain(c)
    wall = time.perf_counter() - start
    run_dir = Path(c.run.storage_path).expanduser().resolve() / c.run.name
    points = [Point(0, 0.0, None)]
    points += [Point(s, max(0.0, t - start_wall), d) for s, d, t in list_checkpoints(run_dir)]
    n_train = plan.steps_per_epoch * plan.global_batch
    last = points[-1].path
    return Pretrained(c.method.name, c, points, wall, metrics, steps,
                      steps * plan.global_batch / max(n_train, 1),
                      TrainState.read(last).stopped if last else None)  # fmt: skip


# ---------------------------------------------------------------- supervised reference


@dataclass
class Supervised:
    encoder: nn.Module
    steps: int
    seconds: float
    epochs: float
    head_top1: float
    images_s: float


def train_supervised(cfg: Config, train: Labelled, val: Labelled, views: Any, budget_s: float,
                     threads: int = 2, batch_size: int = 256, lr: float = 0.2,
                     weight_decay: float = 5e-4, seed: int = 0) -> Supervised:  # fmt: skip
    """The same encoder (same init) + the fine-tuning head (:class:`Classifier`), cross-entropy,
    SGD with Nesterov momentum, trained through the project's step loop in this process
    (`threads` threads): random resized crop (scale 0.5-1) and flip on the device; warm-up and
    cosine (:func:`ssl_dist.optim.lr_at`) over the steps that fit `budget_s`, estimated from the
    first steps' speed; a time limit stops it when the budget is spent."""
    with torch_threads(threads):
        encoder = init_encoder(cfg)
        model = Classifier(encoder, int(train.labels.max()) + 1)
        size = cfg.data.image_size
        aug = nn.Sequential(K.RandomResizedCrop((size, size), scale=(0.5, 1.0)),
                            K.RandomHorizontalFlip())  # fmt: skip
        opt = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=0.9,
                              nesterov=True)  # fmt: skip
        n = len(train.labels)
        batch_size = min(batch_size, n)

        def batches(epoch: int):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            for i in range(0, n - batch_size + 1, batch_size):
                idx = order[i : i + batch_size]
                yield Labelled(train.images[idx], train.labels[idx])

        backend, inputs = TorchBackend(model, opt), ClassifyInputs(views, "cpu", aug)
        state, recorder, warmup, probe_steps = Position(), Recorder(), 10, 8
        start = time.perf_counter()
        limit = TimeLimit(time.monotonic() + budget_s)

        def run(total: int) -> None:
            schedule = Schedule(total, lr, warmup)
            run_steps(backend, inputs, batches, schedule, state, [limit, recorder],
                      seed=lambda epoch, i: view_seed(seed, epoch, i, 0))  # fmt: skip

        run(probe_steps)  # all of it warm-up: the schedule's length does not matter yet
        elapsed = time.perf_counter() - start
        if state.stopped is None:  # fit the cosine to the time that is left
            run(probe_steps + int((budget_s - elapsed) / (elapsed / probe_steps)))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            model.eval()
            logits = torch.cat([model.logits(views.plain(x)) for x in val.images.split(EVAL_BATCH)])
        top1 = (logits.argmax(1) == val.labels).float().mean().item()
    images = recorder.images
    return Supervised(encoder, state.step, seconds, images / n, top1, images / seconds)


# ---------------------------------------------------------------- outputs


def plot(out: Path, curves: dict[str, list[dict[str, Any]]], lines: dict[str, float],
         title: str) -> Path:  # fmt: skip
    """Probe top-1 (solid) and kNN top-1 (dashed) against training minutes, with baselines."""
    import matplotlib  # heavy (a second): only for the plot at the end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        t = [r["train_s"] / 60 for r in rows]
        (line,) = ax.plot(t, [100 * r["probe_top1"] for r in rows], "o-", label=f"{name} probe")
        ax.plot(t, [100 * r["knn_top1"] for r in rows], "x--", color=line.get_color(),
                alpha=0.6, label=f"{name} kNN")  # fmt: skip
    styles = ["k:", "r-.", "g--", "b:", "m-."]
    for (name, value), style in zip(lines.items(), styles * 3, strict=False):
        ax.axhline(100 * value, linestyle=style[1:], color=style[0], linewidth=1, label=name)
    ax.set_xlabel("pretraining wall-clock (min)")
    ax.set_ylabel("top-1 on the 10k test set (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def log_mlflow(uri: str, doc: dict[str, Any], files: Sequence[Path], timeout_s: float = 60.0,
               linked_runs: Sequence[str] = ()) -> str | None:  # fmt: skip
    """One run in experiment ``ssl-dist-bench``: summary metrics, the JSON and the plot.
    Bounded; None (and a warning) when the store is slow or down."""

    def log() -> str:
        from mlflow.entities import Metric, Param, RunTag  # heavy (mlflow): only when logging

        c = tracking.client(uri)
        exp = tracking.experiment_id(c, EXPERIMENT, uri)
        run = c.create_run(exp, run_name=f"quality-{doc['dataset']}-{doc['budget_min']:g}min")
        run_id: str = run.info.run_id
        now = int(time.time() * 1000)
        metrics = []
        for r in doc["rows"]:
            key = r["encoder"].replace(" ", "_").replace("@", "at")
            for m in ("probe_top1", "knn_top1"):
                if isinstance(r.get(m), float):
                    metrics.append(Metric(f"{key}/{m}", r[m], now, int(r.get("step") or 0)))
        for method, rows in doc["curves"].items():
            for r in rows:
                for m in ("probe_top1", "knn_top1"):
                    metrics.append(Metric(f"curve/{method}/{m}", r[m], now, int(r["train_s"])))
        params = [Param(k, str(doc[k])[:6000]) for k in ("budget_min", "recipe", "methods",
                                                          "workers", "dataset")]  # fmt: skip
        tags = [RunTag("ssl_dist.bench", "quality")]
        tags += [RunTag(f"ssl_dist.pretrain_run.{i}", r) for i, r in enumerate(linked_runs)]
        c.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        for f in files:
            c.log_artifact(run_id, str(f))
        c.set_terminated(run_id)
        return run_id

    return tracking.bounded(log, timeout_s, f"log the quality bench at {uri}")


# ---------------------------------------------------------------- the bench


def _row(encoder: str, method: str, scores: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"encoder": encoder, "method": method, **extra, **scores}


def _say(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    out: Path = Path("bench-results/quality.json"),
    work: Path = Path("work/bench-quality"),
    budget_min: float = 15.0,
    methods: Sequence[str] = ("simclr",),
    recipe: Path = RECIPE,
    input_dir: Path = FASHION_MNIST_DIR,
    overrides: Sequence[str] = (),
    supervised: bool = True,
    raw_sizes: Sequence[int] = (32,),
    tracking_uri: str | None = None,
    eval_threads: int = 1,
    supervised_threads: int = 2,
    cache_baselines: bool = True,
) -> dict[str, Any]:
    """Run the whole bench; return the JSON document (also written to `out`)."""
    require_fashion_mnist(input_dir)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}: choose from {list(METHODS)}")
    budget_s = 60.0 * budget_min
    phases: dict[str, float] = {}
    t = time.perf_counter()
    manifest = prepare_shards(work, input_dir)
    phases["prepare_s"] = time.perf_counter() - t
    try:
        uri = tracking.resolve_uri(tracking_uri, DEFAULT_STORAGE)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    load_before = os.getloadavg()  # recorded: other work on the machine skews every number
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfgs = {m: bench_config(recipe, manifest, work, m, f"quality-{m}-{stamp}", overrides, uri)
            for m in methods}  # fmt: skip
    base = next(iter(cfgs.values()))
    workers = base.scaling.num_workers

    runs: list[Pretrained] = []
    calibrations: dict[str, dict[str, float]] = {}
    try:
        for m, cfg in cfgs.items():
            _say(f"{m}: calibrating ({CALIBRATION_STEPS} steps on {workers} Ray workers)")
            t = time.perf_counter()
            cal = calibrate(cfg)
            phases[f"{m}_calibrate_s"] = time.perf_counter() - t
            calibrations[m] = {"step_s": cal.step_s, "startup_s": cal.startup_s}
            steps, _ = plan_budget(budget_s, cal)
            _say(f"{m}: {cal.step_s * 1e3:.0f} ms/step, start-up {cal.startup_s:.0f}s -> "
                 f"{steps} steps in {budget_min:g} min")  # fmt: skip
            t = time.perf_counter()
            runs.append(pretrain_for(cfg, budget_s, cal))
            phases[f"{m}_pretrain_s"] = time.perf_counter() - t
    finally:
        import ray  # heavy (seconds); connect() started it

        if ray.is_initialized():
            ray.shutdown()

    _say("loading the splits for evaluation")
    ev = Evaluator(base, eval_threads, work / "cache" if cache_baselines else None)
    phases["load_splits_s"] = ev.load_s
    rows: list[dict[str, Any]] = []
    t = time.perf_counter()
    raw = {}
    for size in dict.fromkeys([*raw_sizes, base.data.image_size]):
        raw[size] = ev.pixels(size)
        rows.append(_row(f"raw pixels {size}px", "logistic regression", raw[size],
                         train_s=0.0))  # fmt: skip
        _say(f"raw pixels {size}px: probe {raw[size]['probe_top1']:.2%}")
    phases["raw_pixels_s"] = time.perf_counter() - t
    t = time.perf_counter()
    init = ev.random_init()
    phases["probe_init_s"] = time.perf_counter() - t
    rows.append(_row("random init", "-", init, train_s=0.0, step=0))
    _say(f"random init: probe {init['probe_top1']:.2%}")

    curves: dict[str, list[dict[str, Any]]] = {}
    for p in runs:
        t = time.perf_counter()
        curve = []
        for pt in p.points:
            scores = init if pt.path is None else ev.encoder(checkpoint_encoder(pt.path))
            epochs = p.epochs * pt.step / max(p.max_steps, 1)
            curve.append({"step": pt.step, "train_s": pt.seconds, "epochs": epochs, **scores})
            _say(f"{p.method} step {pt.step} ({pt.seconds:.0f}s): probe "
                 f"{scores['probe_top1']:.2%}, kNN {scores['knn_top1']:.2%}")  # fmt: skip
        curves[p.method] = curve
        phases[f"{p.method}_probes_s"] = time.perf_counter() - t
        last = curve[-1]
        rows.append(_row(f"{p.method} @ {budget_min:g} min", p.method,
                         {k: last[k] for k in last if k not in ("train_s", "step", "epochs")},
                         train_s=last["train_s"], step=last["step"], epochs=last["epochs"],
                         images_s=p.metrics.get("images_s")))  # fmt: skip

    sup_info: dict[str, Any] = {}
    if supervised:
        _say(f"supervised reference: {budget_min:g} min, {supervised_threads} threads")
        t = time.perf_counter()
        sup = train_supervised(base, ev.train, ev.val, ev.views, budget_s, supervised_threads)
        phases["supervised_train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = ev.encoder(sup.encoder)
        phases["supervised_probe_s"] = time.perf_counter() - t
        rows.append(_row(f"supervised @ {budget_min:g} min", "cross-entropy", scores,
                         train_s=sup.seconds, step=sup.steps, epochs=sup.epochs,
                         head_top1=sup.head_top1, images_s=sup.images_s))  # fmt: skip
        sup_info = {"head_top1": sup.head_top1, "threads": supervised_threads}
        _say(f"supervised: probe {scores['probe_top1']:.2%} (own head {sup.head_top1:.2%})")

    best_raw = max(r["probe_top1"] for r in raw.values())
    for r in rows:
        r["vs_raw"] = r["probe_top1"] - best_raw
        r["vs_init"] = r["probe_top1"] - init["probe_top1"]
    title = (f"Fashion-MNIST, {base.data.image_size}px, {base.model.encoder} "
             f"{tuple(base.model.widths)}, {workers} Ray workers, {budget_min:g} min")  # fmt: skip
    lines = {f"raw pixels {s}px": v["probe_top1"] for s, v in raw.items()}
    lines["random init"] = init["probe_top1"]
    for r in rows:
        if r["method"] == "cross-entropy":
            lines["supervised (probe)"] = r["probe_top1"]
    png = plot(out.with_suffix(".png"), curves, lines, title)
    doc_extra = {
        "dataset": "fashion-mnist", "budget_min": budget_min, "recipe": str(recipe),
        "methods": list(methods), "workers": workers, "overrides": list(overrides),
        "image_size": base.data.image_size, "curves": curves, "calibration": calibrations,
        "phases_s": phases, "supervised": sup_info, "plot": str(png), "tracking_uri": uri,
        "pretrain_runs": [{"method": p.method, "run": p.cfg.run.name, "max_steps": p.max_steps,
                           "last_step": p.points[-1].step, "wall_s": p.wall_s,
                           "stopped_by_time_limit": p.stopped == "time_limit",
                           "epochs": p.epochs, "mlflow": p.metrics.get("mlflow")} for p in runs],
        "load_avg_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "cpu_count": os.cpu_count(),
    }  # fmt: skip
    write(out, "quality", rows, doc_extra)
    linked = [str((p.metrics.get("mlflow") or {}).get("run_id")) for p in runs
              if (p.metrics.get("mlflow") or {}).get("run_id")]  # fmt: skip
    doc = {"bench": "quality", "rows": rows, **doc_extra}
    t = time.perf_counter()
    run_id = log_mlflow(uri, doc, [out, png], linked_runs=linked)
    phases["mlflow_s"] = time.perf_counter() - t
    doc["mlflow_run_id"] = run_id
    write(out, "quality", rows, {**doc_extra, "mlflow_run_id": run_id})
    print(f"quality bench: {title}; linear probe / kNN top-1 on the official test set")
    print(table(rows, COLUMNS))
    print()
    print(table([{"phase": k, "seconds": v} for k, v in phases.items()], ["phase", "seconds"]))
    print(f"\nwrote {out} and {png}; mlflow run {run_id or 'not logged'} at {uri}")
    return doc
