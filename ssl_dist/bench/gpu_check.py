"""GPU check: the per-worker training path on one device, for every method, precision and ZeRO
stage at two model sizes, in one run; a table and JSON.

What runs is what a Ray Train worker runs (:mod:`ssl_dist.train.loop`) minus Ray, MLflow and
checkpoints: shards streamed by :func:`~ssl_dist.data.stream.stream`, the method's own inputs
built on the device, a DeepSpeed engine (:func:`~ssl_dist.dist.zero.build_engine`) in a
one-rank process group (NCCL on a GPU, gloo on a CPU) and :func:`~ssl_dist.train.runtime.run_steps`
with a :class:`~ssl_dist.train.runtime.PhaseClock` (which synchronises the GPU before each clock
read). So it needs torch, torchvision, timm, DeepSpeed, pydantic, webdataset and kornia, not Ray
or MLflow: ``launch/gpu_check.sh`` installs the missing ones from carried wheels.

Cases: SimCLR, MoCo v2, MoCo v3 x bf16, fp32 x ZeRO 0, 2 x {ResNet-18 at 32 px on Fashion-MNIST
(or digits) shards, ResNet-50 at 224 px on JPEG shards made from a generated ImageNet-layout
folder}. Each case: ``--warmup`` steps, then ``--steps`` timed steps: images/s, the step time
split (data wait / inputs / forward / backward / optimizer, ms per step), peak memory, and the
model FLOP/s (FLOPs of one step counted by ``FlopCounterMode``) against a bf16 matmul peak
measured in the same run. Any failed case makes the exit status 1.

``--device cpu`` rehearses everything but the GPU: batch 2, ResNet-18 at 16 px, ResNet-50 at
32 px (the JPEG shards are the same).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssl_dist import precision
from ssl_dist.bench.report import machine_line, matmul_gflops, table, write
from ssl_dist.bench.scaling import model_flops
from ssl_dist.bench.timed import PHASES, Timer
from ssl_dist.config import Config
from ssl_dist.data.shards import write_shards
from ssl_dist.data.sources import FASHION_MNIST_DIR, digits, fashion_mnist, head
from ssl_dist.data.stream import open_shards
from ssl_dist.dist import zero
from ssl_dist.dist.spawn import single_rank_group
from ssl_dist.train.parts import build_model
from ssl_dist.train.runtime import DeepSpeedBackend, PhaseClock

IDX = "train-images-idx3-ubyte.gz"
METHODS = ("simclr", "moco_v2", "moco_v3")
PRECISIONS = ("bf16", "fp32")
STAGES = (0, 2)
COLUMNS = [
    "model",
    "method",
    "precision",
    "zero",
    "images_s",
    *[f"{p}_ms" for p in PHASES],
    "peak_mem_gib",
    "tflop_s",
    "of_peak",
    "status",
]


def _models(device: str) -> dict[str, dict[str, Any]]:
    """The two model sizes; on a CPU the same paths at rehearsal sizes (a CPU without native
    bf16 emulates it at about 1 GFLOP/s: ResNet-18 at 16 px, ResNet-50 at 32 px, batch 2)."""
    gpu = device == "cuda"
    return {
        "resnet18-32px": {
            "encoder": "resnet18",
            "small_stem": True,
            "image_size": 32 if gpu else 16,
            "batch": 256 if gpu else 2,
            "data": "small",
        },
        "resnet50-224px": {
            "encoder": "resnet50",
            "small_stem": False,
            "image_size": 224 if gpu else 32,
            "batch": 128 if gpu else 2,
            "data": "jpeg",
        },
    }


def prepare_data(work: Path, fmnist: Path, images: int = 10_000) -> dict[str, Path]:
    """Shards for both sizes under `work` (kept between runs): `images` Fashion-MNIST images
    (from the IDX files in `fmnist`, carried, or Debian's dataset-fashion-mnist; digits where
    neither is at hand) and JPEG shards of a generated ImageNet-layout folder of `images` / 5
    files (original bytes, as `data prepare` writes them)."""
    from ssl_dist.data.prepare import prepare_imagefolder
    from ssl_dist.data.synthetic import make_imagefolder

    small = work / "small"
    if not (small / "manifest.json").is_file():
        roots = [r for r in (fmnist, FASHION_MNIST_DIR) if (r / IDX).is_file()]
        source = head(fashion_mnist(roots[0]), images) if roots else digits()
        write_shards(source, small, samples_per_shard=2000, overwrite=True)
    jpeg = work / "jpeg"
    if not (jpeg / "manifest.json").is_file():
        folder = work / "jpeg-folder"
        n = max(images // 5, 20)
        make_imagefolder(
            folder, n, n // 10, dataset="digits", min_side=256, max_side=500, corrupt=0
        )
        prepare_imagefolder(folder, jpeg, 500, 0, 0.0, overwrite=True)
    return {"small": small, "jpeg": jpeg}


def case_config(model: dict[str, Any], method: str, prec: str, stage: int, data: Path) -> Config:
    batch = model["batch"]
    return Config.model_validate(
        {
            "data": {
                "manifest": str(data / "manifest.json"),
                "batch_size": batch,
                "image_size": model["image_size"],
                "channels": 3,
                "loader_workers": min(8, max(1, (os.cpu_count() or 2) // 2)),
                "shuffle_buffer": 4 * batch,
            },
            "model": {
                "encoder": model["encoder"],
                "small_stem": model["small_stem"],
                "proj_hidden": 2048,
                "proj_dim": 128,
                "pred_hidden": 2048,
            },
            "method": {"name": method, "queue_size": 32 * batch, "temperature": 0.2},
            "optim": {"name": "sgd", "lr": 0.3, "weight_decay": 1e-6, "warmup_steps": 0},
            "zero": {"stage": stage, "precision": prec},
            "scaling": {"num_workers": 1},
            "run": {"name": "gpu-check", "epochs": 1000, "seed": 0},
            "tracking": {"enabled": False},
        }
    )


def run_case(cfg: Config, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    shards = open_shards(cfg.data)
    torch.manual_seed(cfg.run.seed)
    method = build_model(cfg).to(device)
    inputs = method.make_inputs(cfg, shards.manifest, device)
    engine = zero.build_engine(method, cfg.zero, cfg.optim, cfg.data.batch_size, 1, cfg.optim.lr)
    clock = PhaseClock(device=device)
    timer = Timer(warmup, clock, device)
    try:
        backend = DeepSpeedBackend(engine, clock)
        out = timer.run(cfg, backend, inputs, shards, steps, cfg.optim.lr)
        if device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out
    finally:
        engine.destroy()
        del engine, method
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bf16_peak_tflops(device: torch.device) -> float:
    """A bf16 matmul peak measured here (synchronised on a GPU)."""
    if device.type != "cuda":
        return matmul_gflops(torch.get_num_threads(), 0.5, 512, torch.bfloat16) / 1e3
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, k = time.perf_counter(), 20
    for _ in range(k):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * k / (time.perf_counter() - start) / 1e12


def run_cases(
    device: torch.device,
    data: dict[str, Path],
    peak: float,
    steps: int,
    warmup: int,
    on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
    only: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Every case in turn (a failed case is a row with its error); each row printed as it ends,
    and `on_row` called with the rows so far (the JSON is rewritten after every case, so a run
    cut short by a time limit keeps what it measured)."""
    rows: list[dict[str, Any]] = []
    flops: dict[tuple[str, str], float] = {}
    models = _models(device.type)
    for name, method, prec, stage in itertools.product(models, METHODS, PRECISIONS, STAGES):
        names = {name, method, prec, f"zero{stage}"}
        if only and not any(set(sel.split(",")) <= names for sel in only):
            continue
        model = models[name]
        cfg = case_config(model, method, prec, stage, data[model["data"]])
        row: dict[str, Any] = {
            "model": name,
            "method": method,
            "precision": precision.resolve(prec, device),
            "zero": stage,
            "batch": cfg.data.batch_size,
        }
        try:
            if (name, method) not in flops:  # per image, whatever the precision or stage
                flops[(name, method)] = model_flops(cfg, batch=2)["train_flops_per_image"]
            row.update(run_case(cfg, device, steps, warmup))
            row["tflop_s"] = flops[(name, method)] * row["images_s"] / 1e12
            row["of_peak"] = row["tflop_s"] / peak
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 (one case's failure is a row)
            traceback.print_exc()
            row["status"] = f"FAILED: {type(e).__name__}: {e}"[:200]
        rows.append(row)
        print(table([row], COLUMNS).splitlines()[-1], flush=True)
        on_row(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--steps", type=int, default=30, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; CPU 1)")
    p.add_argument("--work", type=Path, default=Path("work/gpu-check"))
    p.add_argument("--fmnist", type=Path, default=Path(".gpu/fashion-mnist"), help="IDX files")
    p.add_argument("--out", type=Path, default=Path("bench-results/gpu_check.json"))
    p.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="NAME",
        help="run only the cases one of these selects; a selector is names joined by commas, "
        "all of which the case has (a model such as resnet50-224px, a method, bf16 / fp32, "
        "zero0 / zero2): resnet18-32px resnet50-224px,simclr,bf16; default every case (about "
        "30 s each on one H200)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (use --device cpu to rehearse)", file=sys.stderr)
        return 2
    if args.steps < 1:
        print("gpu_check: --steps must be at least 1", file=sys.stderr)
        return 2
    known = {*_models(args.device), *METHODS, *PRECISIONS, *(f"zero{s}" for s in STAGES)}
    unknown = sorted({n for sel in args.only for n in sel.split(",")} - known)
    if unknown:
        print(f"gpu_check: --only names no case: {', '.join(unknown)}", file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else (5 if args.device == "cuda" else 1)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("SSL_DIST_NO_PROGRESS", "1")
    print(machine_line(), flush=True)
    data = prepare_data(args.work, args.fmnist, 10_000 if device.type == "cuda" else 500)
    peak = bf16_peak_tflops(device)
    print(f"bf16 matmul peak measured: {peak:.1f} TFLOP/s", flush=True)
    extra = {
        "steps": args.steps,
        "warmup": warmup,
        "bf16_peak_tflop_s": peak,
        "device": str(device),
    }
    with single_rank_group(device):
        rows = run_cases(
            device,
            data,
            peak,
            args.steps,
            warmup,
            lambda done: write(args.out, "gpu_check", done, {**extra, "complete": False}),
            tuple(args.only),
        )
    print(table(rows, COLUMNS))
    write(args.out, "gpu_check", rows, {**extra, "complete": True})
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases ok; JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
