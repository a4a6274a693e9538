"""`ssl-dist bench scaling`: where the time of a Fashion-MNIST training step goes, and how the
recipe scales from 1 to 2 workers and across 2 Ray nodes.

One run measures, on the Fashion-MNIST recipe at one global batch (the recipe's per-worker batch
times its worker count):

* images/s of the Ray trainer (DeepSpeed engine, the real worker loop) with 1 and 2 workers on a
  local Ray instance, and with 2 workers on a local 2-node ``ray.cluster_utils.Cluster`` (head
  1 CPU + node 1 CPU, so one worker per node: collectives cross node boundaries through gloo
  over TCP instead of DeepSpeed's shared-memory all-reduce);
* a bare single-process PyTorch loop (:func:`ssl_dist.train.local.run_local`: same shards,
  views, method and optimizer; no Ray, no DeepSpeed) on the same encoder and global batch with
  every core as intra-op threads: the throughput check is Ray 2 workers / bare (target >= 0.9);
* the share of step time in each phase, from an instrumented loop that mirrors the worker loop
  in a 2-process gloo group (one thread each, as the workers): waiting for the next batch
  (``next()`` on the stream), the two-view augmentation, forward, the all-gather of the
  projections (forward: all-gather; backward: all-reduce of their gradients; timed inside the
  real loss through tensor hooks), backward, the gradient all-reduce (one flat buffer, as
  DeepSpeed's ZeRO-0 averaging) and the optimizer step; medians per rank, slowest rank;
* model FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``: forward + backward of
  both views through encoder, projector and loss) and the achieved FLOP/s of each run against
  this machine's fp32 matmul peak, measured in the same run (1 thread and every core).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssl_dist.bench.fmnist import prepare_shards, require_fashion_mnist
from ssl_dist.bench.quality import RECIPE
from ssl_dist.bench.report import matmul_peaks, table, torch_threads, write
from ssl_dist.bench.train import plain_rate, ray_rate
from ssl_dist.config import Config, load_config
from ssl_dist.data.sources import FASHION_MNIST_DIR
from ssl_dist.dist import collectives
from ssl_dist.dist.spawn import run_world
from ssl_dist.train.runtime import Hook, PhaseClock, Position, Schedule, TorchBackend, run_steps

WARMUP = 5
"""Untimed steps at the start of every measurement (the trainer's own ``_Speed.WARMUP``)."""
WORLD_TIMEOUT_S = 1800.0
"""Seconds the phase timing's gloo group may take in all, also its collectives' timeout."""
PHASES = (
    "data",
    "inputs",
    "forward",
    "gather_fwd",
    "backward",
    "gather_bwd",
    "grad_allreduce",
    "optimizer",
)
"""Phases of a step as the step loop's :class:`PhaseClock` names them (``inputs``: the views)."""
RATE_COLUMNS = [
    "runner",
    "nodes",
    "workers",
    "per_worker_batch",
    "images_s",
    "step_ms",
    "scaling_eff",
    "vs_bare",
    "gflop_s",
    "of_peak",
]


# ---------------------------------------------------------------- machine and model


def model_flops(cfg: Config, batch: int = 16) -> dict[str, float]:
    """FLOPs per image of one training step (the method's inputs, e.g. 2 views, forward +
    backward, encoder + heads + loss) and of one encoder forward (one view), counted by
    ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    from ssl_dist.train.parts import build_model

    method = build_model(cfg)
    size, c = cfg.data.image_size, cfg.data.channels
    args = method.example_inputs(batch, c, size)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = method(*args)
        loss.backward()
    train = counter.get_total_flops() / batch
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        method.encoder.eval()(args[0])
    return {
        "train_flops_per_image": float(train),
        "encoder_forward_flops_per_view": float(counter.get_total_flops() / batch),
    }


# ---------------------------------------------------------------- throughput


def _cfg(
    base: Config, workers: int, global_batch: int, steps: int, storage: Path, name: str
) -> Config:
    c = base.model_copy(deep=True)
    c.scaling.num_workers = workers
    c.data.batch_size = global_batch // workers
    c.run.max_steps, c.run.checkpoint_every, c.run.log_every = steps, 10 * steps, steps
    c.run.epochs = 1000
    c.run.storage_path = str(storage.resolve())
    c.run.name = f"{name}-{time.time_ns()}"
    c.tracking.enabled = False
    return c


def _rate_row(
    runner: str, nodes: int, workers: int, per_worker_batch: int, rate: dict[str, float]
) -> dict[str, Any]:
    """One row of the throughput table (`rate`: images_s, step_ms and what else was measured)."""
    where = {"runner": runner, "nodes": nodes, "workers": workers}
    return {**where, "per_worker_batch": per_worker_batch, **rate}


def bare_rate(cfg: Config, threads: int) -> dict[str, float]:
    """The same training in one process (`threads` threads), no Ray, no DeepSpeed."""
    c = cfg.model_copy(deep=True)
    c.scaling.cpus_per_worker = threads
    with torch_threads(threads):  # plain_rate sets the count itself; restored after
        r = plain_rate(c)
    return {"images_s": r["images_s"], "step_ms": r["step_ms"]}


# ---------------------------------------------------------------- phase shares (gloo group)


def _timed_gather(clock: PhaseClock, original: Callable[[torch.Tensor], torch.Tensor]):
    """``all_gather_with_grad`` that books its forward and its backward on `clock`."""

    def gather(x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = original(x)
        clock.add("gather_fwd", time.perf_counter() - start)
        if out.requires_grad and x.requires_grad:
            mark = [0.0]

            def grad_out(g: torch.Tensor) -> None:
                mark[0] = time.perf_counter()

            def grad_in(g: torch.Tensor) -> None:
                clock.add("gather_bwd", time.perf_counter() - mark[0])

            out.register_hook(grad_out)
            x.register_hook(grad_in)
        return out

    return gather


def _mean_allreduce(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over the group in one flat buffer (as DeepSpeed's ZeRO-0 does)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = collectives.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class _PhaseRows(Hook):
    """One row of phase seconds per timed optimizer step (after `WARMUP` untimed ones); the
    gathers run inside forward and backward, so they are taken out of those two phases."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock, self.last = clock, time.perf_counter()
        self.rows: list[dict[str, float]] = []

    def after_step(self, state, out) -> None:
        t = {p: 0.0 for p in PHASES} | self.clock.take()
        t["forward"] -= t["gather_fwd"]
        t["backward"] -= t["gather_bwd"]
        now = time.perf_counter()
        if out.step > WARMUP:
            self.rows.append({**{p: t[p] for p in PHASES}, "step": now - self.last})
        self.last = now


def _phase_worker(rank: int, world: int, job: dict[str, Any]) -> list[list[float]]:
    """One rank of the instrumented loop. Returns, on every rank, one row per rank: the median
    seconds of each phase in `PHASES` order, the median step and the mean step."""
    from ssl_dist.data.stream import open_shards, stream
    from ssl_dist.optim import build_optimizer, param_groups
    from ssl_dist.train.parts import build_model, plan_steps, view_seed

    cfg = Config.model_validate(job["config"])
    shards = open_shards(cfg.data)
    plan = plan_steps(cfg, shards, world)
    method = build_model(cfg)
    opt = build_optimizer(param_groups(method, cfg.optim.weight_decay), cfg.optim, plan.peak_lr)
    clock = PhaseClock()
    collectives.all_gather_with_grad = _timed_gather(  # type: ignore[assignment]
        clock, collectives.all_gather_with_grad
    )
    rows = _PhaseRows(clock)
    inputs = method.make_inputs(cfg, shards.manifest, "cpu")
    crops = getattr(inputs, "crop_scale", None)  # as the worker: crops cut in the loader
    run_steps(
        TorchBackend(
            method, opt, allreduce=_mean_allreduce, clock=clock, precision=cfg.zero.precision
        ),
        inputs,
        lambda epoch: stream(
            cfg.data, rank, world, epoch, cfg.run.seed, shards=shards, crop_scale=crops
        ),
        Schedule(WARMUP + job["steps"], plan.peak_lr, cfg.optim.warmup_steps),
        Position(),
        [rows],
        seed=lambda epoch, i: view_seed(cfg.run.seed, epoch, i, rank),
        clock=clock,
    )
    keys = (*PHASES, "step")
    med = {k: statistics.median(r[k] for r in rows.rows) for k in keys}
    mean = sum(r["step"] for r in rows.rows) / len(rows.rows)
    both = collectives.all_gather_no_grad(
        torch.tensor([[med[k] for k in keys] + [mean]], dtype=torch.float64)
    )
    per_rank: list[list[float]] = both.tolist()
    return per_rank


def phase_shares(cfg: Config, steps: int, world: int = 2) -> list[dict[str, Any]]:
    """Per-phase median milliseconds and share of the step, per rank, from a spawned gloo
    group of `world` processes (one thread each, as a Ray worker with cpus_per_worker=1)
    running the instrumented loop for `steps` timed steps."""
    job = {"config": cfg.model_dump(mode="json"), "steps": steps}
    per_rank = run_world(_phase_worker, world, job, timeout=WORLD_TIMEOUT_S)[0]
    rows = []
    for rank, values in enumerate(per_rank):
        med = dict(zip((*PHASES, "step"), values[:-1], strict=True))
        total = sum(med[p] for p in PHASES)
        for p in PHASES:
            share = med[p] / total if total else 0.0
            rows.append({"rank": rank, "phase": p, "ms": 1e3 * med[p], "share": share})
        step = {"rank": rank, "phase": "step (median)", "ms": 1e3 * med["step"], "share": 1.0}
        rows.append({**step, "mean_ms": 1e3 * values[-1]})
    return rows


# ---------------------------------------------------------------- the bench


def _say(msg: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    out: Path = Path("bench-results/scaling.json"),
    work: Path = Path("work/bench-quality"),
    recipe: Path = RECIPE,
    input_dir: Path = FASHION_MNIST_DIR,
    steps: int = 30,
    phase_steps: int = 20,
    overrides: tuple[str, ...] | list[str] = (),
    cluster: bool = True,
) -> dict[str, Any]:
    """Measure everything; print the tables; write `out`. Returns the document."""
    import ray

    require_fashion_mnist(input_dir)
    manifest = prepare_shards(work, input_dir)
    base = load_config(recipe, [f"data.manifest={manifest}", *overrides])
    recipe_workers = base.scaling.num_workers
    if not isinstance(recipe_workers, int):
        recipe_workers = recipe_workers[0]
    global_batch = base.data.batch_size * recipe_workers
    if global_batch % 2:
        raise ValueError(f"the global batch {global_batch} must be even (2 workers)")
    cores = os.cpu_count() or 1
    storage = work / "scaling-runs"
    steps_all = WARMUP + steps

    load_before = os.getloadavg()  # recorded: other work on the machine skews every number
    _say("fp32 matmul peak and model FLOPs")
    peaks = matmul_peaks()
    peak1, peak_all = peaks["fp32_1_thread"], peaks[f"fp32_{cores}_threads"]
    peak_bf16 = peaks[f"bf16_{cores}_threads"]
    flops = model_flops(base)

    rows: list[dict[str, Any]] = []
    _say(f"bare single-process loop, {cores} threads, batch {global_batch}")
    bare = bare_rate(_cfg(base, 1, global_batch, steps_all, storage, "bare"), cores)
    rows.append(_rate_row(f"bare torch ({cores} threads)", 1, 1, global_batch, bare))

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for workers in (1, 2):
            _say(f"Ray, {workers} worker(s), 1 node")
            rate = ray_rate(_cfg(base, workers, global_batch, steps_all, storage, f"w{workers}"))
            rows.append(_rate_row("ray + deepspeed", 1, workers, global_batch // workers, rate))
    finally:
        ray.shutdown()
    if cluster:
        from ray.cluster_utils import Cluster

        _say("Ray, 2 workers on a local 2-node cluster (1 CPU each)")
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            c.add_node(num_cpus=1)
            ray.init(address=c.address, log_to_driver=False)
            rate = ray_rate(_cfg(base, 2, global_batch, steps_all, storage, "cluster"))
            rows.append(_rate_row("ray + deepspeed", 2, 2, global_batch // 2, rate))
        finally:
            ray.shutdown()
            c.shutdown()

    one = next(r for r in rows if r["runner"].startswith("ray") and r["workers"] == 1)
    for r in rows:
        r["vs_bare"] = r["images_s"] / bare["images_s"]
        if r["runner"].startswith("ray") and r["workers"] == 2:
            r["scaling_eff"] = r["images_s"] / (2 * one["images_s"])
        r["gflop_s"] = r["images_s"] * flops["train_flops_per_image"] / 1e9
        r["of_peak"] = r["gflop_s"] / peak_all

    _say(f"phase shares: instrumented loop, 2-process gloo group, {phase_steps} steps")
    pc = _cfg(base, 2, global_batch, phase_steps, storage, "phases")
    phases = phase_shares(pc, phase_steps)

    two = next(
        r for r in rows if r["runner"].startswith("ray") and r["workers"] == 2 and r["nodes"] == 1
    )
    check = {
        "ray_2_workers_images_s": two["images_s"],
        "bare_images_s": bare["images_s"],
        "ratio": two["vs_bare"],
        "target": 0.9,
        "ok": two["vs_bare"] >= 0.9,
    }
    machine_rows = [
        {"what": "fp32 matmul peak, 1 thread", "gflop_s": peak1},
        {"what": f"fp32 matmul peak, {cores} threads", "gflop_s": peak_all},
        {"what": f"bf16 matmul peak, {cores} threads (AMX where present)", "gflop_s": peak_bf16},
        {
            "what": "model GFLOP per image, train step (2 views, fwd+bwd)",
            "gflop_s": flops["train_flops_per_image"] / 1e9,
        },
        {
            "what": "model GFLOP per view, encoder forward",
            "gflop_s": flops["encoder_forward_flops_per_view"] / 1e9,
        },
    ]
    title = (
        f"scaling bench: fashion-mnist {base.data.image_size}px, {base.model.encoder} "
        f"{tuple(base.model.widths)} depths {tuple(base.model.depths)}, "
        f"{base.method.name}, global batch {global_batch}, {steps} timed steps "
        f"(+{WARMUP} warm-up), fp32, 1 CPU per worker"
    )
    print(title)
    print(table(rows, RATE_COLUMNS))
    print()
    print(
        f"throughput check: Ray 2 workers / bare = {check['ratio']:.3f} "
        f"(target >= 0.9: {'ok' if check['ok'] else 'MISSED'})"
    )
    print()
    print("step phases, instrumented loop in a 2-process gloo group (median ms per step)")
    print(table(phases, ["rank", "phase", "ms", "share", "mean_ms"]))
    print()
    print(table(machine_rows, ["what", "gflop_s"]))
    extra = {
        "phases": phases,
        "machine_peaks": machine_rows,
        "flops": flops,
        "throughput_check": check,
        "global_batch": global_batch,
        "steps": steps,
        "warmup": WARMUP,
        "recipe": str(recipe),
        "overrides": list(overrides),
        "load_avg_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "cpu_count": cores,
    }
    write(out, "scaling", rows, extra)
    print(f"\nwrote {out}")
    return {"bench": "scaling", "rows": rows, **extra}
