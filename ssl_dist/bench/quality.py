"""`ssl-dist bench quality`: how good a self-supervised encoder gets on real data in a fixed time.

On Fashion-MNIST (Debian's ``dataset-fashion-mnist`` IDX files; the official 10k test set is the
manifest's ``val`` split), one run:

1. prepares shards once (cached in the work dir);
2. calibrates (after a one-step warm-up run) the step time and a run's start-up cost;
3. pretrains each method on Ray workers for ``budget`` wall-clock seconds: ``run.max_steps`` is
   set from the calibration (the cosine schedule then ends when the time does), with
   ``checkpoints`` probe points; then the best method again with other seeds;
4. trains the same encoder supervised (cross-entropy, linear head, in this process, same
   wall-clock budget, same cores): the upper reference;
5. evaluates, on frozen features of the un-augmented view, with the project's linear probe
   (:func:`ssl_dist.evaluate.probe.probe_features`: L-BFGS, L2 penalty chosen on a held-out
   20% of train) and the kNN monitor (k = 20, cosine, whole train split as bank): every
   pretraining checkpoint, random init, the supervised encoder, and logistic regression on raw
   pixels (standardised; at 32 px and the recipe's size);
6. prints a table, writes JSON and a PNG (probe accuracy against training time), and logs a run
   to MLflow (experiment ``ssl-dist-bench``; bounded, a tracking failure costs a warning).

Each finished piece goes to a journal: ``--resume`` continues (:mod:`ssl_dist.bench.journal`).

Random init is the training init (``torch.manual_seed(run.seed)``, then
:func:`ssl_dist.train.parts.build_model`; with ``model.zero_init_residual`` every residual block
starts as the identity), which the supervised run also starts from.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ssl_dist import tracking
from ssl_dist.bench.budget import (
    CHECKPOINTS,
    Calibration,
    Pretrained,
    pretrain_all,
    with_seed,
)
from ssl_dist.bench.features import Evaluator, checkpoint_encoder, train_supervised
from ssl_dist.bench.fmnist import prepare_shards, require_fashion_mnist
from ssl_dist.bench.journal import Journal
from ssl_dist.bench.quality_report import log_mlflow, plot
from ssl_dist.bench.report import matmul_peaks, table, write
from ssl_dist.config import Config, ConfigError, load_config
from ssl_dist.data.shards import manifest_sha256
from ssl_dist.data.sources import FASHION_MNIST_DIR
from ssl_dist.evaluate.source import DEFAULT_STORAGE

RECIPE = Path("launch/recipes/fashion-mnist-cpu.yaml")
METHODS = ("simclr", "moco_v2", "moco_v3", "byol", "rotation", "simmim", "dino")
"""What ``--method all`` runs: every method that trains the recipe's ResNet. MAE needs a ViT
encoder; on a ResNet recipe masked completion is SimMIM (pass ``mae`` with a ViT recipe)."""
KNOWN = (*METHODS, "mae")
"""Every method the bench accepts by name."""
LARS_1 = ("optim.lr=1.0",)
"""The recipe's LARS rate (2.0) is SimCLR's; the other LARS methods were measured at 1.0."""
METHOD_OVERRIDES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("moco_v2", "moco_v3", "byol", "rotation"), LARS_1),
    # DINO: a head of K = 256 (the recipe's 65536 would be most of the step at this width) and
    # AdamW as in its reference; 2 local crops of 12 px beside the 2 global 28 px ones.
    "dino": (
        "method.dino.out_dim=256",
        "method.dino.hidden_dim=256",
        "method.dino.bottleneck_dim=64",
        "method.dino.local_crops=2",
        "method.dino.local_size=12",
        "optim.name=adamw",
        "optim.lr=2e-3",
        "optim.weight_decay=0.04",
    ),
    # SimMIM masks 4 px squares, half of them (75 %: probe +5.1 / kNN +0.4 points over init in
    # 80 steps of the learn test, 50 %: +5.0 / +4.4); the side must be a multiple of the
    # encoder's stride (8): 32 px.
    "simmim": ("data.image_size=32", "method.masked.mask_ratio=0.5", *LARS_1),
    # MAE on the small ViT (only with a ViT recipe or these overrides): AdamW as in its reference.
    "mae": (
        "model.encoder=vit_tiny",
        "model.vit_heads=3",
        "optim.name=adamw",
        "optim.lr=1.5e-3",
        "optim.weight_decay=0.05",
        "optim.betas=[0.9, 0.95]",
    ),
}
"""Each method's changes to the recipe (before the user's ``--override``s, which win)."""
COLUMNS = [
    "encoder",
    "method",
    "train_s",
    "step",
    "epochs",
    "seed",
    "probe_top1",
    "knn_top1",
    "probe_wd",
    "vs_raw",
    "vs_init",
    "images_s",
]


# ---------------------------------------------------------------- the recipe per method


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
    cfg = load_config(
        recipe,
        [
            f"data.manifest={manifest}",
            f"method.name={method}",
            f"run.storage_path={(work / 'runs').resolve()}",
            f"run.name={name}",
            "tracking.knn_every_epochs=0",
            *METHOD_OVERRIDES.get(method, ()),
            *overrides,
        ],
    )
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    return cfg


# ---------------------------------------------------------------- the bench


def _row(encoder: str, method: str, scores: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"encoder": encoder, "method": method, **extra, **scores}


def _say(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _curve(
    ev: Evaluator, p: Pretrained, init: dict[str, Any], only_last: bool = False
) -> list[dict[str, Any]]:
    """Probe and kNN at each of `p`'s points (random init is `init`), or at its last only."""
    curve = []
    for pt in p.points[-1:] if only_last else p.points:
        scores = init if pt.path is None else ev.encoder(checkpoint_encoder(pt.path), p.cfg)
        epochs = p.epochs * pt.step / max(p.max_steps, 1)
        curve.append({"step": pt.step, "train_s": pt.seconds, "epochs": epochs, **scores})
        _say(
            f"{p.method} (seed {p.cfg.run.seed}) step {pt.step} ({pt.seconds:.0f}s): probe "
            f"{scores['probe_top1']:.2%}, kNN {scores['knn_top1']:.2%}"
        )
    return curve


def _run_row(p: Pretrained, last: dict[str, Any], budget_min: float) -> dict[str, Any]:
    return _row(
        f"{p.method} @ {budget_min:g} min",
        p.method,
        {k: last[k] for k in last if k not in ("train_s", "step", "epochs")},
        seed=p.cfg.run.seed,
        train_s=last["train_s"],
        step=last["step"],
        epochs=last["epochs"],
        images_s=p.metrics.get("images_s"),
    )


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
    checkpoints: int = CHECKPOINTS,
    seeds: int = 2,
    holdout: int = 0,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the whole bench; return the JSON document (also written to `out`).

    `seeds` > 1 pretrains the best method (by its last probe) again with ``run.seed`` + 1, ...
    for the same budget; its rows and ``seed_spread`` give the spread between seeds.
    `holdout` > 0 scores on the last `holdout` train images instead of the official test set,
    which is then never read (for tuning). `resume` continues the bench whose journal is in
    `work` (:mod:`ssl_dist.bench.journal`): what it finished is not run again."""
    require_fashion_mnist(input_dir)
    for m in methods:
        if m not in KNOWN:
            raise ConfigError(f"unknown method {m!r}: choose from {list(KNOWN)}")
    if checkpoints < 1:
        raise ConfigError(f"checkpoints must be at least 1, got {checkpoints}")
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    if resume:
        Journal.require(work)
    budget_s = 60.0 * budget_min
    phases: dict[str, float] = {}
    t = time.perf_counter()
    manifest = prepare_shards(work, input_dir, holdout_n=holdout)
    scored_on = (
        f"the last {holdout} train images (held out)" if holdout else "the official test set"
    )
    phases["prepare_s"] = time.perf_counter() - t
    try:
        uri = tracking.resolve_uri(tracking_uri, DEFAULT_STORAGE)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfgs = {
        m: bench_config(recipe, manifest, work, m, f"quality-{m}-{stamp}", overrides, uri)
        for m in methods
    }
    base = next(iter(cfgs.values()))
    workers = base.scaling.num_workers
    settings = {
        "methods": list(methods),
        "budget_min": budget_min,
        "recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(),
        "overrides": list(overrides),
        "method_overrides": {m: list(METHOD_OVERRIDES.get(m, ())) for m in methods},
        "checkpoints": checkpoints,
        "seeds": seeds,
        "holdout": holdout,
        "manifest_sha256": manifest_sha256(str(manifest)),
        "supervised": [supervised, supervised_threads],
    }
    journal = Journal.open(work, settings, resume)
    load_before = os.getloadavg()  # recorded: other work on the machine skews every number
    peak = matmul_peaks()
    _say(", ".join(f"{k} {v:.0f}" for k, v in peak.items()) + " GFLOP/s (matmul peaks)")
    journal.begin_part(peak, load_before)
    if journal.resumed:
        _say(f"resuming: {', '.join(journal.data['runs']) or 'no run'} finished before")
    if journal.dropped:
        _say(f"run again (never probed, checkpoints gone): {', '.join(journal.dropped)}")

    _say("loading the splits for evaluation")
    ev = Evaluator(base, eval_threads, work / "cache" if cache_baselines else None)
    phases["load_splits_s"] = ev.load_s
    rows: list[dict[str, Any]] = []
    t = time.perf_counter()
    raw = {}
    for size in dict.fromkeys([*raw_sizes, base.data.image_size]):
        raw[size] = ev.pixels(size)
        rows.append(_row(f"raw pixels {size}px", "logistic regression", raw[size], train_s=0.0))
        _say(f"raw pixels {size}px: probe {raw[size]['probe_top1']:.2%}")
    phases["raw_pixels_s"] = time.perf_counter() - t
    t = time.perf_counter()
    init = ev.random_init()
    phases["probe_init_s"] = time.perf_counter() - t
    rows.append(_row("random init", "-", init, train_s=0.0, step=0))
    _say(f"random init: probe {init['probe_top1']:.2%}")

    def probe(key: str, p: Pretrained) -> list[dict[str, Any]]:
        """Every point of a method's run; the last only of a run with another seed."""
        return _curve(ev, p, init, only_last=key != p.method)

    cals: dict[str, Calibration] = {}
    resumer = journal.resumer(probe, phases)
    runs = pretrain_all(cfgs, budget_s, checkpoints, cals, phases, _say, **resumer)
    curves: dict[str, list[dict[str, Any]]] = {}
    for p in runs:
        curves[p.method] = journal.curve(p.method, phases, partial(probe, p.method, p))
        rows.append(_run_row(p, curves[p.method][-1], budget_min))

    spread: dict[str, Any] = {}
    reruns: list[Pretrained] = []
    if seeds > 1 and runs:
        # The best method by its last probe again, with other seeds (its calibration reused).
        best = max(runs, key=lambda p: curves[p.method][-1]["probe_top1"])
        m, seed0 = best.method, cfgs[best.method].run.seed
        again = {f"{m}_seed{seed0 + k}": with_seed(cfgs[m], seed0 + k) for k in range(1, seeds)}
        _say(f"{m} is best: {len(again)} more run(s) with other seeds")
        finals = [{**curves[m][-1], "seed": seed0}]
        reruns = pretrain_all(again, budget_s, checkpoints, cals, phases, _say, **resumer)
        for key, p in zip(again, reruns, strict=True):
            last = journal.curve(key, phases, partial(probe, key, p))[-1]
            rows.append(_run_row(p, last, budget_min))
            finals.append({**last, "seed": p.cfg.run.seed})
        spread = {"method": m, "seeds": [f["seed"] for f in finals]}
        for k in ("probe_top1", "knn_top1"):
            spread[k] = [f[k] for f in finals]
            spread[f"{k}_spread"] = max(spread[k]) - min(spread[k])
        _say(
            f"{m} over seeds {spread['seeds']}: probe spread {spread['probe_top1_spread']:.2%}, "
            f"kNN spread {spread['knn_top1_spread']:.2%}"
        )

    sup_info: dict[str, Any] = {}
    if supervised and journal.supervised:
        _say("supervised reference: trained by an earlier part of this bench (resumed)")
        rows.append(journal.supervised["row"])
        sup_info = journal.supervised["info"]
    elif supervised:
        _say(f"supervised reference: {budget_min:g} min, {supervised_threads} threads")
        t = time.perf_counter()
        sup = train_supervised(base, ev.train, ev.val, ev.views, budget_s, supervised_threads)
        phases["supervised_train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = ev.encoder(sup.encoder)
        phases["supervised_probe_s"] = time.perf_counter() - t
        rows.append(
            _row(
                f"supervised @ {budget_min:g} min",
                "cross-entropy",
                scores,
                train_s=sup.seconds,
                step=sup.steps,
                epochs=sup.epochs,
                head_top1=sup.head_top1,
                images_s=sup.images_s,
            )
        )
        sup_info = {"head_top1": sup.head_top1, "threads": supervised_threads}
        journal.add_supervised(rows[-1], sup_info)
        _say(f"supervised: probe {scores['probe_top1']:.2%} (own head {sup.head_top1:.2%})")

    best_raw = max(r["probe_top1"] for r in raw.values())
    for r in rows:
        r["vs_raw"] = r["probe_top1"] - best_raw
        r["vs_init"] = r["probe_top1"] - init["probe_top1"]
    title = (
        f"Fashion-MNIST, {base.data.image_size}px, {base.model.encoder} "
        f"{tuple(base.model.widths)}, {workers} Ray workers, {budget_min:g} min"
    )
    keys = ("probe_top1", "knn_top1")
    lines = {f"raw pixels {s}px": {k: v[k] for k in keys} for s, v in raw.items()}
    lines["random init"] = {k: init[k] for k in keys}
    for r in rows:
        if r["method"] == "cross-entropy":
            lines["supervised"] = {k: r[k] for k in keys}
    png = plot(out.with_suffix(".png"), curves, lines, title)
    doc_extra = {
        "dataset": "fashion-mnist",
        "scored_on": scored_on,
        "holdout": holdout,
        "budget_min": budget_min,
        "recipe": str(recipe),
        "methods": list(methods),
        "workers": workers,
        "overrides": list(overrides),
        "method_overrides": {m: list(METHOD_OVERRIDES.get(m, ())) for m in methods},
        "checkpoints": checkpoints,
        "image_size": base.data.image_size,
        "curves": curves,
        "calibration": journal.data["calibrations"],
        "parts": journal.data["parts"],
        "seed_spread": spread,
        "matmul_peak_gflop_s": peak,
        "phases_s": phases,
        "supervised": sup_info,
        "plot": str(png),
        "tracking_uri": uri,
        "pretrain_runs": [p.summary() for p in runs + reruns],
        "load_avg_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "cpu_count": os.cpu_count(),
    }
    write(out, "quality", rows, doc_extra)
    linked = [
        str((p.metrics.get("mlflow") or {}).get("run_id"))
        for p in runs + reruns
        if (p.metrics.get("mlflow") or {}).get("run_id")
    ]
    doc = {"bench": "quality", "rows": rows, **doc_extra}
    t = time.perf_counter()
    run_id = log_mlflow(uri, doc, [out, png], linked_runs=linked)
    phases["mlflow_s"] = time.perf_counter() - t
    doc["mlflow_run_id"] = run_id
    write(out, "quality", rows, {**doc_extra, "mlflow_run_id": run_id})
    print(f"quality bench: {title}; linear probe / kNN top-1 on {scored_on}")
    print(table(rows, COLUMNS))
    if spread:
        print(
            f"{spread['method']} over seeds {spread['seeds']}: linear probe "
            f"{spread['probe_top1']}, kNN {spread['knn_top1']}"
        )
    print()
    print(table([{"phase": k, "seconds": v} for k, v in phases.items()], ["phase", "seconds"]))
    print(f"\nwrote {out} and {png}; mlflow run {run_id or 'not logged'} at {uri}")
    return doc
