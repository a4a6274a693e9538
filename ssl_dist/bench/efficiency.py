"""`ssl-dist bench efficiency`: one training worker's images/s under each change that could make
its step cheaper, measured in one run on this machine.

Each variant trains the recipe (default the Fashion-MNIST CPU recipe, SimCLR) in this process on
the same shards, with the same loader (decoding in the process, as the recipe's workers do),
the method's own inputs, a plain torch optimizer and the step loop every run uses
(:func:`ssl_dist.train.runtime.run_steps`), on `cpus_per_worker` threads: what one Ray worker
does on its core, without Ray's own processes. Variants:

- ``eager``: the recipe in fp32, channels-first, without compilation (the baseline: every
  variant but ``bf16`` runs fp32, so that on a CPU where the recipe's ``auto`` picks bf16 each
  change is still measured against fp32 and bf16 is a change of its own);
- ``channels_last``: model weights and activations in channels-last memory layout;
- ``compile``: ``torch.compile`` (inductor) of the whole task (encoder, heads, loss); its
  compilation shows in the warm-up time (``warmup_s``), which a run pays once per process.
  Inductor's layout optimisation (channels-last convolutions) is turned off: on our CPU build
  (torch 2.14.1, AVX2) channels-last convolution training corrupts the heap, see below;
- ``compile+channels_last``: both;
- ``bf16``: autocast to bfloat16, run only where :func:`ssl_dist.precision.resolve` picks it
  for ``auto`` (a CPU with native bf16: AVX-512 BF16 or AMX); elsewhere the row says why not.

Each variant runs in a child process of its own (spawned), so that one that crashes the
interpreter is a row saying so, not the end of the bench: training the thin ResNet in
channels-last layout on our torch 2.14.1 CPU build (AVX2) can abort with glibc's "corrupted
size vs. prev_size" / "double free or corruption" (every time at the tiny test widths, not in a
run at the Fashion-MNIST recipe's; inductor's default layout optimisation did the same), while
single convolution, BN and pooling layers in channels-last do not.

The table gives images/s, the ratio to ``eager``, the step split (data wait, inputs, forward,
backward, optimizer) and the warm-up seconds. Writes ``bench-results/efficiency.json``.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ssl_dist import precision
from ssl_dist.bench.report import table, write
from ssl_dist.bench.timed import PHASES, Timer
from ssl_dist.config import Config, ConfigError
from ssl_dist.data.stream import open_shards
from ssl_dist.optim import build_optimizer, param_groups
from ssl_dist.train.parts import build_model
from ssl_dist.train.runtime import PhaseClock, TorchBackend

VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last", "bf16")
COLUMNS = [
    "variant",
    "images_s",
    "vs_eager",
    *[f"{p}_ms" for p in PHASES],
    "warmup_s",
    "status",
]


def run_variant(cfg: Config, variant: str, steps: int, warmup: int) -> dict[str, Any]:
    """Train `cfg` for `warmup` + `steps` steps under `variant`; the timed steps' figures."""
    cpu = torch.device("cpu")
    prec = "bf16" if variant == "bf16" else "fp32"
    shards = open_shards(cfg.data)
    torch.manual_seed(cfg.run.seed)
    method = build_model(cfg)
    if "channels_last" in variant:
        method = method.to(memory_format=torch.channels_last)
    inputs = method.make_inputs(cfg, shards.manifest, cpu)
    optimizer = build_optimizer(param_groups(method, cfg.optim.weight_decay), cfg.optim, 0.1)
    module: nn.Module = method
    if "compile" in variant:
        import torch._inductor.config as inductor

        inductor.layout_optimization = "channels_last" in variant
        module = cast(nn.Module, torch.compile(method))  # a module (OptimizedModule) comes back
    clock = PhaseClock(device=cpu)
    timer = Timer(warmup, clock, cpu)  # no clean-up after: each variant has its own process
    backend = TorchBackend(module, optimizer, clock=clock, precision=prec)
    return {**timer.run(cfg, backend, inputs, shards, steps, 0.1), "precision": prec}


def _child(cfg: Config, variant: str, steps: int, warmup: int, threads: int, q: Any) -> None:
    torch.set_num_threads(threads)
    try:
        q.put({**run_variant(cfg, variant, steps, warmup), "status": "ok"})
    except Exception as e:  # noqa: BLE001 (one variant's failure is a row)
        q.put({"status": f"FAILED: {type(e).__name__}: {e}"[:200]})


def _in_child(cfg: Config, variant: str, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """`run_variant` in a spawned process: its row, or how the process died."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(cfg, variant, steps, warmup, threads, q), daemon=True)
    p.start()
    while True:
        try:
            result: dict[str, Any] = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive():
                code = p.exitcode or 0
                why = signal.Signals(-code).name if code < 0 else f"exit code {code}"
                result = {"status": f"FAILED: the process died ({why})"}
                break
    p.join(timeout=30)
    return result


def run(
    cfg: Config,
    out: Path = Path("bench-results/efficiency.json"),
    steps: int = 30,
    warmup: int = 5,
    variants: Sequence[str] = VARIANTS,
) -> list[dict[str, Any]]:
    """Every variant in turn (a failed one is a row with its error); prints the table."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or steps < 1 or warmup < 1:
        raise ConfigError(
            f"bench efficiency: variants must be among {list(VARIANTS)} (got {unknown}), "
            f"steps and warmup at least 1 (got {steps}, {warmup})"
        )
    native_bf16 = precision.resolve("auto", torch.device("cpu")) == "bf16"
    rows: list[dict[str, Any]] = []
    threads = cfg.scaling.cpus_per_worker
    for v in variants:
        row: dict[str, Any] = {"variant": v}
        if v == "bf16" and not native_bf16:
            row["status"] = "not run: no native bf16 on this CPU (auto picks fp32)"
        else:
            start = time.perf_counter()
            row.update(_in_child(cfg, v, steps, warmup, threads))
            row["wall_s"] = time.perf_counter() - start
        rows.append(row)
        print(table([row], COLUMNS).splitlines()[-1], flush=True)
    base = next((r["images_s"] for r in rows if r["variant"] == "eager" and "images_s" in r), 0)
    for r in rows:
        if base and "images_s" in r:
            r["vs_eager"] = r["images_s"] / base
    print(
        f"bench efficiency: {cfg.method.name}, {cfg.model.encoder} {tuple(cfg.model.widths)}, "
        f"{cfg.data.image_size}px, batch {cfg.data.batch_size}, {threads} thread(s), "
        f"{steps} timed steps after {warmup}"
    )
    print(table(rows, COLUMNS))
    extra = {"steps": steps, "warmup": warmup, "threads": threads}
    write(out, "efficiency", rows, {**extra, "config": cfg.model_dump(mode="json")})
    return rows
