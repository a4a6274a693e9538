"""`ssl-dist bench loss`: what gathered negatives cost, and how fast each method trains on CPU.

Two measurements:

* NT-Xent forward + backward on a real gloo world (``world_size`` processes on 127.0.0.1, one
  thread each) with negatives gathered from every rank (``gather=True``: logits
  ``[2N, 2 N_g]`` plus an all-gather forward and an all-reduce backward) against local-only
  negatives (``gather=False``: logits ``[2N, 2N]``, no communication), for several global
  batches, and the gather alone (``all_gather_with_grad`` of ``[N, 2D]`` forward + backward).
  Every rank runs the same number of iterations (collectives need it), chosen from a timed
  calibration step; a row reports the slowest rank's median.
* Training throughput of each method in one process: images per second through forward,
  backward and the momentum update (each image gives two views) on the CPU encoder.

Timings are medians over iterations (``images_s_mean`` is the plain mean rate): on a small shared
machine other processes cause spikes that would otherwise dominate a few-iteration mean.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ssl_dist.bench.report import table, timed, torch_threads, write
from ssl_dist.config import MethodConfig, ModelConfig
from ssl_dist.dist import collectives
from ssl_dist.dist.spawn import run_world
from ssl_dist.losses import nt_xent_loss
from ssl_dist.methods import build_method
from ssl_dist.train.runtime import Hook, Position, Schedule, TorchBackend, run_steps

if TYPE_CHECKING:
    pass

LOSS_COLUMNS = [
    "global_batch",
    "per_rank",
    "negatives_gathered",
    "negatives_local",
    "gathered_ms",
    "local_ms",
    "gathered_vs_local",
    "gather_only_ms",
]
WORLD_TIMEOUT_S = 1800.0
"""Seconds the whole gloo measurement may take (every batch), also its collectives' timeout."""
MIN_STEPS = 3
"""Fewest timed steps per method, whatever ``seconds`` says."""
METHOD_COLUMNS = [
    "method",
    "batch",
    "image_size",
    "steps",
    "step_ms",
    "images_s",
    "images_s_mean",
    "vs_simclr",
]


def _slowest(seconds: float) -> float:
    """Largest of every rank's ``seconds`` (also a barrier)."""
    return float(collectives.all_gather_no_grad(torch.tensor([seconds])).max())


def _per_iteration(step: Callable[[], None], seconds: float) -> float:
    """Median seconds per call of ``step`` on the slowest rank, after one warm-up call.

    The iteration count comes from one timed call, maximised over ranks, so that every rank
    runs the same number of calls (a gathered loss would otherwise wait forever). The median
    resists spikes from other processes sharing the cores.
    """
    step()
    start = time.perf_counter()
    step()
    one = _slowest(time.perf_counter() - start)
    iterations = max(3, math.ceil(seconds / max(one, 1e-6)))
    _slowest(0.0)
    durations = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
    return _slowest(statistics.median(durations))


def _loss_row(global_batch: int, dim: int, temperature: float, seconds: float) -> dict[str, Any]:
    world = collectives.world_size()
    n = global_batch // world
    gen = torch.Generator().manual_seed(collectives.rank())
    z1 = torch.randn(n, dim, generator=gen).requires_grad_()
    z2 = torch.randn(n, dim, generator=gen).requires_grad_()

    def loss_step(gather: bool) -> Callable[[], None]:
        def step() -> None:
            z1.grad = z2.grad = None
            nt_xent_loss(z1, z2, temperature, gather=gather).backward()

        return step

    pair = torch.cat([z1, z2], dim=1).detach().requires_grad_()

    def gather_step() -> None:
        pair.grad = None
        collectives.all_gather_with_grad(pair).sum().backward()

    gathered = _per_iteration(loss_step(True), seconds)
    local = _per_iteration(loss_step(False), seconds)
    return {
        "global_batch": global_batch,
        "per_rank": n,
        "negatives_gathered": 2 * global_batch - 2,
        "negatives_local": 2 * n - 2,
        "gathered_ms": 1e3 * gathered,
        "local_ms": 1e3 * local,
        "gathered_vs_local": gathered / local,
        "gather_only_ms": 1e3 * _per_iteration(gather_step, seconds / 2),
    }


def _loss_worker(rank: int, world_size: int, job: dict[str, Any]) -> list[dict[str, Any]]:
    """One rank of the loss benchmark: a row per global batch (every rank returns the same
    rows, each timing being the slowest rank's)."""
    return [_loss_row(b, job["dim"], job["temperature"], job["seconds"]) for b in job["batches"]]


def loss_rows(
    batches: Sequence[int], dim: int, world_size: int, temperature: float, seconds: float
) -> list[dict[str, Any]]:
    """Gathered vs local NT-Xent timings from a spawned gloo world (one row per global batch)."""
    bad = [b for b in batches if b % world_size]
    if bad:
        raise ValueError(f"global batches {bad} are not multiples of world_size={world_size}")
    job = {"batches": list(batches), "dim": dim, "temperature": temperature, "seconds": seconds}
    per_rank = run_world(_loss_worker, world_size, job, timeout=WORLD_TIMEOUT_S)
    rows: list[dict[str, Any]] = per_rank[0]
    return rows


class _OneStep(Hook):
    """Stops the step loop after every optimizer step: the bench times steps one by one."""

    def should_stop(self, state) -> str | None:
        return "timed"


def _train_step(backend: TorchBackend, x1: Tensor, x2: Tensor, durations: list[float]) -> int:
    """One training step of the step loop (forward, backward, SGD step, momentum update) on
    fixed views, timed."""
    start = time.perf_counter()
    run_steps(
        backend,
        lambda batch, seed: (x1, x2),
        lambda epoch: itertools.repeat(None),
        Schedule(total_steps=100, peak_lr=1e-3),
        Position(),
        [_OneStep()],
        images_of=lambda batch: x1.shape[0],
    )
    durations.append(time.perf_counter() - start)
    return x1.shape[0]


def method_rows(
    methods: Sequence[str], batch: int, image_size: int, widths: Sequence[int], seconds: float
) -> list[dict[str, Any]]:
    """Training-step images/s of each method in this process (the step loop on fixed views:
    forward, backward, SGD step, momentum update).

    Steps run round-robin over the methods (one step of each per round) for about
    ``seconds`` per method and at least ``MIN_STEPS`` rounds, so that load from other processes
    hits every method alike instead of whichever happens to run while it lasts.
    """

    model = ModelConfig(encoder="thin_resnet", widths=tuple(widths))
    gen = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(batch, 3, image_size, image_size, generator=gen) for _ in range(2))
    built: dict[str, TorchBackend] = {}
    for name in methods:
        torch.manual_seed(0)
        cfg = MethodConfig(name=name, queue_size=max(4096 // batch, 1) * batch)  # type: ignore[arg-type]
        method = build_method(cfg, model, 3, image_size)
        opt = torch.optim.SGD(method.trainable_parameters(), lr=0.0)
        built[name] = TorchBackend(method, opt, precision="auto")  # as `pretrain` would run
    durations: dict[str, list[float]] = {name: [] for name in built}

    def one_round() -> int:
        return sum(_train_step(m, x1, x2, durations[name]) for name, m in built.items())

    one_round()  # warm-up
    for d in durations.values():
        d.clear()
    timed(one_round, seconds * len(built))
    while min(len(d) for d in durations.values()) < MIN_STEPS:
        one_round()
    rows: list[dict[str, Any]] = []
    for name, d in durations.items():
        median = statistics.median(d)
        rows.append(
            {
                "method": name,
                "batch": batch,
                "image_size": image_size,
                "steps": len(d),
                "step_ms": 1e3 * median,
                "images_s": batch / median,
                "images_s_mean": batch * len(d) / sum(d),
            }
        )
    base = next((r["images_s"] for r in rows if r["method"] == "simclr"), None)
    for r in rows:
        if base:
            r["vs_simclr"] = r["images_s"] / base
    return rows


def run(
    out: Path = Path("bench-results/loss.json"),
    seconds: float = 2.0,
    batches: Sequence[int] = (256, 1024, 4096),
    dim: int = 128,
    world_size: int = 2,
    temperature: float = 0.2,
    methods: Sequence[str] = ("simclr", "moco_v2", "moco_v3"),
    method_batch: int = 128,
    image_size: int = 32,
    widths: Sequence[int] = (16, 32, 64, 128),
    threads: int = 1,
) -> dict[str, Any]:
    """Run both measurements, print two tables and write ``out`` (JSON).

    Args:
        out: JSON results file.
        seconds: Minimum seconds per measurement.
        batches: Global batch sizes of the loss benchmark (multiples of ``world_size``).
        dim: Embedding width of the loss benchmark.
        world_size: Processes of the gloo world (one thread each).
        temperature: NT-Xent temperature.
        methods: Methods whose training throughput is measured.
        method_batch: Images per step of the method benchmark.
        image_size: Image side of the method benchmark.
        widths: ``thin_resnet`` stage widths of the method benchmark.
        threads: Torch threads of the method benchmark. 1 (the default) is what one training
            worker gets with the default ``scaling.cpus_per_worker=1``; it also avoids OpenMP
            spin-waiting, which on a shared, oversubscribed machine made 2 threads ~10x slower.

    Returns:
        The document written to ``out``.
    """
    loss = loss_rows(batches, dim, world_size, temperature, seconds)
    with torch_threads(threads):
        per_method = method_rows(methods, method_batch, image_size, widths, seconds)
    print(f"NT-Xent forward+backward, D={dim}, world {world_size} (gloo, 1 thread per rank)")
    print(table(loss, LOSS_COLUMNS))
    print()
    print(
        f"methods, 1 process, {threads} thread(s), thin_resnet {tuple(widths)}, "
        f"{image_size} px: forward + backward + momentum update (2 views per image)"
    )
    print(table(per_method, METHOD_COLUMNS))
    extra = {
        "methods": per_method,
        "dim": dim,
        "world_size": world_size,
        "temperature": temperature,
        "threads": threads,
        "widths": list(widths),
    }
    write(out, "loss", loss, extra)
    print(f"\nwrote {out}")
    return {"bench": "loss", "rows": loss, **extra}
