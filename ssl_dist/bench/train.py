"""`ssl-dist bench train`: what Ray Train and DeepSpeed cost over a bare training loop.

At one global batch, per method: a plain single-process loop (no Ray, no DeepSpeed), Ray with 1
and 2 workers under ZeRO 0, and (SimCLR) 2 workers under ZeRO 1, 2 and 3. Reported per run:
images/s and step time after warm-up, scaling efficiency, peak RSS per rank, and the parameter +
optimizer-state bytes one rank holds beside what the ZeRO paper's accounting predicts.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from ssl_dist.bench.report import table, write
from ssl_dist.config import Config, load_config

WARMUP = 5


def _cfg(
    manifest: str,
    storage: Path,
    method: str,
    global_batch: int,
    workers: int,
    stage: int,
    steps: int,
    name: str,
) -> Config:
    return load_config(
        "launch/recipes/digits-demo.yaml",
        [
            f"data.manifest={manifest}",
            f"method.name={method}",
            "method.queue_size=4096",
            f"data.batch_size={global_batch // workers}",
            f"scaling.num_workers={workers}",
            f"zero.stage={stage}",
            "optim.name=sgd",
            "optim.lr=0.1",
            "run.epochs=1000",
            f"run.max_steps={steps}",
            f"run.checkpoint_every={10 * steps}",
            "run.log_every=1",
            f"run.storage_path={storage}",
            f"run.name={name}",
        ],
    )


def plain_rate(cfg: Config) -> dict:
    """Steady-state images/s of the single-process loop (no Ray, no DeepSpeed)."""
    from ssl_dist.train.local import run_local

    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, loss: float, metrics: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    run_local(cfg, knn=False, on_step=on_step)
    steady = times[WARMUP:] or times
    step_s = sum(steady) / len(steady)
    return {
        "images_s": cfg.data.batch_size / step_s,
        "step_ms": step_s * 1e3,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def ray_rate(cfg: Config) -> dict:
    """Steady-state images/s, step time and memory of the real trainer (Ray initialised)."""
    from ssl_dist.train.driver import build_trainer, resolve_paths

    m = build_trainer(resolve_paths(cfg)).fit().metrics
    return {k: m[k] for k in ("images_s", "step_ms", "peak_rss_mb", "state_mb", "zero_formula_mb")}


def run(
    out: Path,
    work: Path,
    steps: int = 30,
    global_batch: int = 128,
    methods: tuple[str, ...] = ("simclr", "moco_v2", "moco_v3"),
) -> None:
    import ray

    from ssl_dist.data.shards import write_shards
    from ssl_dist.data.sources import digits

    data = work / "data"
    if not (data / "manifest.json").is_file():
        write_shards(digits(), data, samples_per_shard=100, overwrite=True)
    manifest = str((data / "manifest.json").resolve())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for method in methods:
        plans = [("plain torch", 1, 0), ("ray", 1, 0), ("ray", 2, 0)]
        if method == "simclr":
            plans += [("ray", 2, 1), ("ray", 2, 2), ("ray", 2, 3)]
        for kind, workers, stage in plans:
            name = f"{method}-{kind.split()[0]}-w{workers}-z{stage}-{time.time_ns()}"
            cfg = _cfg(manifest, work / "runs", method, global_batch, workers, stage, steps, name)
            r = plain_rate(cfg) if kind == "plain torch" else ray_rate(cfg)
            rows.append(
                {
                    "method": method,
                    "runner": kind,
                    "workers": workers,
                    "zero": stage if kind == "ray" else "-",
                    **r,
                }
            )
            print(
                f"  {method} {kind} workers={workers} zero={stage}: {r['images_s']:.0f} img/s",
                flush=True,
            )
    for r in rows:
        base = next(b for b in rows if b["method"] == r["method"] and b["runner"] == "plain torch")
        r["vs_plain"] = r["images_s"] / base["images_s"]
        if r["runner"] == "ray" and r["workers"] == 2 and r["zero"] == 0:
            one = next(
                b
                for b in rows
                if b["method"] == r["method"] and b["runner"] == "ray" and b["workers"] == 1
            )
            r["scaling_eff"] = r["images_s"] / (2 * one["images_s"])
    ray.shutdown()
    print(
        f"train bench: digits 32 px, thin_resnet, global batch {global_batch}, {steps} steps "
        f"({WARMUP} warm-up), SGD, fp32, 1 CPU per worker"
    )
    print(
        table(
            rows,
            [
                "method",
                "runner",
                "workers",
                "zero",
                "images_s",
                "step_ms",
                "vs_plain",
                "scaling_eff",
                "peak_rss_mb",
                "state_mb",
                "zero_formula_mb",
            ],
        )
    )
    write(out, "train", rows, {"global_batch": global_batch, "steps": steps, "warmup": WARMUP})
    print(f"\nwrote {out}")
