"""The per-worker training loop that Ray Train runs on every rank.

Reads top to bottom: context -> data, views, method -> DeepSpeed engine -> resume -> epochs of
steps -> checkpoints. Every rank runs the same number of steps (the stream guarantees it), so the
collectives inside the loss, the engine and the checkpoint never wait on a missing rank.

Elastic runs (``scaling.num_workers: [min, max]``): Ray Train restarts the worker group at a new
size from the last checkpoint, and this loop carries on from there (:func:`_elastic_plan`,
:func:`_resize`):

* ZeRO 1-3 state is re-partitioned for the new world size (``zero.load(..., reshard=True)``);
  model, momentum encoder, buffers (the MoCo v2 queue) and optimizer state carry over exactly.
* The run keeps the step count it planned at its first world size (``run.max_steps`` when set,
  else ``epochs`` x steps per epoch at that size), so the learning-rate and momentum schedules
  keep their length. ``keep_per_worker_batch``: the global batch follows the world size and the
  peak learning rate is rescaled with it (``optim.lr_scaling``); an epoch-based plan then sees
  more (grown) or fewer (shrunk) samples than ``run.epochs`` passes. ``keep_global_batch``:
  gradient accumulation makes up the first size's global batch (refused if it does not divide),
  so learning rate and samples per step stay the same.
* The stream position is approximate: ``batch_in_epoch`` counted the old split's micro-batches;
  at the new size the run skips ``batch_in_epoch * old_size // new_size`` micro-batches (rounded
  down to whole optimizer steps), about as many samples of the epoch as were consumed. The new
  split deals the shards differently, so within this epoch some samples are seen twice and some
  not at all; later epochs are exact again.
* ``TrainState.world_sizes`` records ``[step, size]`` at the start and at every change; MLflow
  gets a ``world_size`` metric at every (re)start and the history as a run tag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch

from ssl_dist.config import Config, to_yaml
from ssl_dist.data.stream import EpochDamage, open_shards, stream
from ssl_dist.dist import collectives, zero
from ssl_dist.methods.moco import MoCoV2
from ssl_dist.train import checkpoint as ckpt
from ssl_dist.train.parts import StepPlan, build_model, build_views, plan_steps, view_seed

log = logging.getLogger(__name__)


class _Preempted:
    """Set by SIGTERM; checked at step boundaries, agreed across ranks, then checkpoint + exit."""

    flag = False

    @classmethod
    def install(cls) -> None:
        cls.flag = False  # a fresh segment, even in a process that was preempted before

        def handler(signum: int, frame: Any) -> None:
            cls.flag = True

        # Outside the main thread signal() raises ValueError: no chance to checkpoint there.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, handler)


def _device(cfg: Config) -> torch.device:
    if cfg.scaling.use_gpu != "no" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` holds the resolved run config as plain data."""
    cfg = Config.model_validate(config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    _Preempted.install()
    device = _device(cfg)

    shards = open_shards(cfg.data)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    resumed = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        d = Path(stack.enter_context(resumed.as_directory())) if resumed is not None else None
        # Read before the engine is built: at a new world size the policy may change grad_accum.
        state = ckpt.TrainState(world_size=world_size) if d is None else ckpt.TrainState.read(d)
        if not state.world_sizes:  # a fresh run, or a checkpoint from before the history
            state.world_sizes.append([state.step, state.world_size])
        plan, micro = _elastic_plan(cfg, shards, world_size, first_size=state.world_sizes[0][1])
        views = build_views(cfg, shards.manifest).to(device)
        method = build_model(cfg).to(device)
        optim = cfg.optim.model_copy(update={"grad_accum": micro})
        engine = zero.build_engine(
            method, cfg.zero, optim, cfg.data.batch_size, world_size, plan.peak_lr
        )
        if d is not None:
            zero.load(engine, d / ckpt.DEEPSPEED_DIR, reshard=True)
            ckpt.load_rng(d, rank)
            if rank == 0:
                reached = ckpt.read_progress(run_dir)
                lost = f"; {reached - state.step} steps lost" if reached else ""
                print(f"resumed from step {state.step} (epoch {state.epoch}, saved by "
                      f"{state.world_size} workers, now {world_size}){lost}",
                      file=sys.stderr)  # fmt: skip
            if state.world_size != world_size:
                _resize(state, world_size, plan, micro, method, cfg, rank)
            state.world_size = world_size
            state.resumed_at.append(state.step)
    if state.world_sizes[-1][1] != world_size:
        state.world_sizes.append([state.step, world_size])
    tracker = _Tracker(cfg, state, config.get("mlflow_run_id"), shards, views, device, rank)
    # The driver's deadline (epoch seconds, the same on every node) on this worker's monotonic
    # clock: a wall-clock step during the run cannot move it.
    deadline = config.get("deadline")
    if deadline is not None:
        deadline = time.monotonic() + deadline - time.time()
    tracker.world_size(state.step, world_size, state.world_sizes)

    bar = _progress(plan.total_steps, state.step) if rank == 0 else None
    speed = _Speed(state.step)
    t_last, images_since = time.perf_counter(), 0
    if cfg.run.stop_at_step is not None and state.step >= cfg.run.stop_at_step:
        return  # this segment already ran
    while state.step < plan.total_steps:
        data = stream(cfg.data, rank, world_size, state.epoch, cfg.run.seed, shards=shards)
        for i, batch in enumerate(data):
            if i < state.batch_in_epoch:
                continue  # fast-forward to where the checkpoint stopped in this epoch
            if i % micro == 0:
                zero.set_lr(engine, plan.lr(state.step, cfg))
            x1, x2 = views(batch.images.to(device, non_blocking=True),
                           seed=view_seed(cfg.run.seed, state.epoch, i, rank))  # fmt: skip
            loss, metrics = engine(x1, x2)
            engine.backward(loss)
            engine.step()
            state.batch_in_epoch = i + 1
            images_since += batch.images.shape[0]
            if (i + 1) % micro:
                continue
            state.step += 1
            speed.tick(state.step, batch.images.shape[0] * micro * world_size)
            momentum = zero.momentum_update(method, state.step, plan.total_steps)
            done = state.step >= plan.total_steps
            stop = _agree_to_stop(deadline, rank, state.step) or (
                "stop_at_step" if state.step == cfg.run.stop_at_step else None
            )
            state.stopped = None if done else stop
            if state.step % cfg.run.log_every == 0 or done:
                if rank == 0 and "://" not in cfg.run.storage_path:
                    ckpt.write_progress(run_dir, state.step)  # for "steps lost" after a restart
                # all_reduce: a sync point on every rank (and a CPU-GPU sync on GPU).
                mean_loss = collectives.all_reduce_mean(loss.detach().float()).item()
                now = time.perf_counter()
                ips = images_since * world_size / (now - t_last)
                t_last, images_since = now, 0
                tracker.step(state.step, {"loss": mean_loss, "lr": plan.lr(state.step - 1, cfg),
                                          "images_s": ips, "momentum": momentum,
                                          "epoch": state.epoch}, metrics)  # fmt: skip
                if bar is not None:
                    bar.update(state.step - bar.n)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", m=f"{momentum:.4f}",
                                    lr=f"{plan.lr(state.step - 1, cfg):.3g}",
                                    img_s=f"{ips:.0f}")  # fmt: skip
            if done:
                speed.pause(lambda: tracker.knn(method, state.step))
            if state.step % cfg.run.checkpoint_every == 0 or done or stop:
                final = _final_metrics(engine, method, cfg, world_size, speed) if done else {}
                _save(engine, cfg, state, plan.total_steps, rank, final, tracker)
            if done or stop:
                break
        else:
            _report_data(data, shards, tracker, state.step, device)
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if state.epoch % max(cfg.tracking.knn_every_epochs, 1) == 0:
                speed.pause(lambda: tracker.knn(method, state.step))
            continue
        _report_data(data, shards, tracker, state.step, device)
        break
    if bar is not None:
        bar.close()
    tracker.close()
    if _Preempted.flag:
        raise SystemExit("preempted: final checkpoint written")


def _report_data(data, shards, tracker: _Tracker, step: int, device: torch.device) -> None:
    """At the end of an epoch (or of this segment), where every rank arrives: every rank's
    lost, skipped and top-up counts and its damaged shards, gathered to rank 0 (a collective)
    and reported there."""
    names = [info.name for info in shards.infos]
    rows = collectives.all_gather_no_grad(data.stats.row(names).to(device)[None])
    tracker.data(step, EpochDamage.from_rows(rows.cpu(), names))


def _elastic_plan(cfg: Config, shards, world_size: int, first_size: int) -> tuple[StepPlan, int]:
    """The step plan and gradient accumulation at `world_size` for a run that started with
    `first_size` workers (see the module docstring for the policies)."""
    accum = cfg.optim.grad_accum
    if world_size == first_size:
        return plan_steps(cfg, shards, world_size), accum
    if cfg.scaling.elastic_policy == "keep_global_batch":
        global_batch = cfg.data.batch_size * first_size * accum
        per_micro = cfg.data.batch_size * world_size
        if global_batch % per_micro:
            raise ValueError(
                f"scaling.elastic_policy=keep_global_batch: the global batch {global_batch} "
                f"(data.batch_size={cfg.data.batch_size} x {first_size} workers x "
                f"optim.grad_accum={accum}) is not a multiple of {per_micro} (batch_size x "
                f"{world_size} workers), so no gradient accumulation keeps it at {world_size} "
                "workers; choose grad_accum and the [min, max] range so that it divides, or use "
                "keep_per_worker_batch"
            )
        accum = global_batch // per_micro
    optim = cfg.optim.model_copy(update={"grad_accum": accum})
    plan = plan_steps(cfg.model_copy(update={"optim": optim}), shards, world_size)
    # The run keeps the step count it planned at its first size (and so its schedules).
    planned = plan_steps(cfg, shards, first_size).total_steps
    return dataclasses.replace(plan, total_steps=planned), accum


def _resize(state: ckpt.TrainState, world_size: int, plan: StepPlan, micro: int, method,
            cfg: Config, rank: int) -> None:  # fmt: skip
    """Carry a checkpoint written by `state.world_size` workers over to `world_size`: the
    stream position (approximate, see the module docstring) and the MoCo v2 queue pointer."""
    old = state.batch_in_epoch
    state.batch_in_epoch = old * state.world_size // world_size // micro * micro
    if state.batch_in_epoch >= plan.batches_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    if isinstance(method, MoCoV2):  # one global batch of keys per micro-batch
        method.realign_queue(cfg.data.batch_size * (world_size if cfg.method.gather else 1))
    if rank == 0:
        print(f"world size {state.world_size} -> {world_size}: stream position micro-batch "
              f"{old} -> {state.batch_in_epoch} of epoch {state.epoch}, global batch "
              f"{plan.global_batch}, peak lr {plan.peak_lr:.4g}, {plan.total_steps} steps "
              "in all", file=sys.stderr)  # fmt: skip


def _agree_to_stop(deadline: float | None, rank: int, step: int) -> str | None:
    """``preempted`` / ``time_limit`` on every rank when any rank got SIGTERM or is past the
    run's time limit (`deadline`, on time.monotonic()), else None: a two-value all_reduce per
    step."""
    late = deadline is not None and time.monotonic() >= deadline
    flags = collectives.all_reduce_max(torch.tensor([float(_Preempted.flag), float(late)]))
    if flags[0].item() > 0:
        _Preempted.flag = True
        return "preempted"
    if flags[1].item() > 0:
        if rank == 0:
            print(f"run.time_limit_s reached at step {step}: stopping with a checkpoint; run the "
                  "same name again to continue", file=sys.stderr)  # fmt: skip
        return "time_limit"
    return None


class _Speed:
    """Steady-state throughput: the clock starts after WARMUP steps of this invocation."""

    WARMUP = 5

    def __init__(self, start_step: int) -> None:
        self.start_step, self.t0, self.images, self.steps = start_step, 0.0, 0, 0

    def tick(self, step: int, global_images: int) -> None:
        if step - self.start_step == self.WARMUP:
            self.t0 = time.perf_counter()
        elif step - self.start_step > self.WARMUP:
            self.images += global_images
            self.steps += 1

    def pause(self, work) -> None:
        """Run `work` (evaluation) without counting its time as training time."""
        t = time.perf_counter()
        work()
        if self.steps or self.t0:
            self.t0 += time.perf_counter() - t

    def summary(self) -> dict[str, float]:
        secs = time.perf_counter() - self.t0 if self.steps else 0.0
        return {"images_s": self.images / secs if secs else 0.0,
                "step_ms": 1e3 * secs / self.steps if self.steps else 0.0}  # fmt: skip


def _final_metrics(engine, method, cfg: Config, world_size: int, speed: _Speed) -> dict:
    """Throughput and per-rank memory at the end of a run (max over ranks: a collective)."""
    import resource

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state_mb = zero.state_bytes(engine) / 2**20
    peak = collectives.all_reduce_max(torch.tensor([rss_mb, state_mb], dtype=torch.float64))
    formula = zero.zero_formula_bytes(method, cfg.zero.stage, world_size) / 2**20
    return {**speed.summary(), "peak_rss_mb": peak[0].item(), "state_mb": peak[1].item(),
            "zero_formula_mb": formula}  # fmt: skip


def _save(engine, cfg: Config, state: ckpt.TrainState, total: int, rank: int,
          extra: dict | None, tracker: _Tracker) -> None:  # fmt: skip
    """Every rank writes its DeepSpeed shard into its own temp dir; Ray merges them into one
    checkpoint. Rank 0 adds the consolidated encoder, the config and (last) the train state."""
    with tempfile.TemporaryDirectory(prefix="ssl-dist-ckpt-") as tmp:
        d = Path(tmp)
        zero.save(engine, d / ckpt.DEEPSPEED_DIR, client_state={"step": state.step})
        ckpt.save_rng(d, rank)
        full = zero.consolidated_state_dict(engine)  # a collective under ZeRO-3: all ranks
        if rank == 0:
            assert full is not None
            meta = {"method": cfg.method.name, "encoder": cfg.model.encoder,
                    "step": str(state.step), "in_chans": str(cfg.data.channels),
                    "image_size": str(cfg.data.image_size)}  # fmt: skip
            ckpt.save_encoder(d / ckpt.ENCODER, ckpt.encoder_state(full), meta)
            ckpt.write_atomic(d / "config.yaml", to_yaml(cfg))
            state.mlflow_run_id = tracker.run_id or state.mlflow_run_id
            ckpt.write_atomic(d / ckpt.STATE, state.to_json())
            tracker.checkpoint(d, state.step)
        metrics = {"step": state.step, "epoch": state.epoch, "total_steps": total,
                   "world_size": state.world_size, **(extra or {})}  # fmt: skip
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="pretrain", file=sys.stderr,
                mininterval=1.0, disable=os.environ.get("SSL_DIST_NO_PROGRESS") == "1")  # fmt: skip


class _Tracker:
    """Rank 0's MLflow logging (a `RunLogger`), the per-epoch kNN monitor and system metrics.
    On other ranks, and with tracking off, every method does nothing (kNN still gathers ZeRO-3
    parameters on every rank, as that is a collective)."""

    def __init__(self, cfg: Config, state: ckpt.TrainState, driver_run_id: str | None,
                 shards, views, device: torch.device, rank: int) -> None:  # fmt: skip
        from ssl_dist import tracking

        self.cfg, self.views, self.device, self.rank = cfg, views, device, rank
        self.num_classes = len(shards.manifest.classes)
        self.enabled = cfg.tracking.enabled
        self.logger = None
        if self.enabled and rank == 0:
            uri = tracking.resolve_uri(cfg.tracking.uri, cfg.run.storage_path)
            run_id = state.mlflow_run_id or driver_run_id
            self.logger = tracking.RunLogger(cfg, uri, run_id)
        self._proc: Any = None
        self.damaged: set[str] = set()

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id if self.logger else None

    def step(self, step: int, values: dict[str, float], method_metrics: dict) -> None:
        if self.logger is None:
            return
        out = dict(values)
        out.update({f"method/{k}": float(v) for k, v in method_metrics.items()})
        out.update(self._system())
        self.logger.metrics(step, out)

    def data(self, step: int, damage: EpochDamage) -> None:
        """An epoch's data counts: metrics (``data/...``) every epoch; on damage the report on
        stderr and the tag naming every damaged shard seen by this worker group."""
        if self.rank != 0:
            return
        lines = damage.lines()
        for line in lines:
            print(f"step {step}: {line}", file=sys.stderr)
        self.damaged.update(damage.damaged)
        if self.logger is None:
            return
        self.logger.metrics(step, damage.metrics())
        if damage.damaged:
            names = sorted(self.damaged)
            tag = ", ".join(names)
            if len(tag) > 4000:  # MLflow's limit on a tag value is 5000 characters
                tag = f"{tag[:4000].rsplit(', ', 1)[0]} ... ({len(names)} shards)"
            self.logger.tags({"ssl_dist.damaged_shards": tag})

    def world_size(self, step: int, size: int, history: list[list[int]]) -> None:
        """Logged at every (re)start: the metric's history is the run's world-size history;
        the tag holds it whole (``[step, size]`` pairs)."""
        if self.logger is not None:
            self.logger.metrics(step, {"world_size": float(size)})
            self.logger.tags({"ssl_dist.world_size_history": json.dumps(history)})

    def _system(self) -> dict[str, float]:
        import psutil

        if self._proc is None:
            self._proc = psutil.Process()
            self._proc.cpu_percent()  # the first call only starts the measurement
        out = {"system/cpu_percent": self._proc.cpu_percent(),
               "system/rss_mb": self._proc.memory_info().rss / 2**20}  # fmt: skip
        if self.device.type == "cuda":
            out["system/gpu_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out

    def knn(self, method, step: int) -> None:
        if not self.enabled or self.cfg.tracking.knn_every_epochs == 0:
            return
        from ssl_dist.evaluate.knn import knn_accuracy

        encoder = method.encoder
        with zero.gathered(list(encoder.parameters())):
            if self.rank != 0:
                return
            t = time.perf_counter()
            acc = knn_accuracy(encoder, self.cfg.data, self.views, self.num_classes,
                               self.device, max_bank=self.cfg.tracking.knn_bank)  # fmt: skip
            secs = time.perf_counter() - t
        print(f"step {step}: kNN top-1 on {self.cfg.data.val_split} {acc:.1%} ({secs:.1f}s)",
              file=sys.stderr)  # fmt: skip
        if self.logger is not None:
            self.logger.metrics(step, {"knn_top1": acc})

    def checkpoint(self, directory: Path, step: int) -> None:
        if self.logger is None:
            return
        files = [directory / ckpt.ENCODER, directory / "config.yaml", directory / ckpt.STATE]
        self.logger.artifacts(files, f"checkpoints/step-{step:08d}")

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close(timeout_s=self.cfg.tracking.flush_timeout_s)
