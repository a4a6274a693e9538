"""Pretraining on a wall-clock budget, for `bench quality`: a short calibration run measures the
step time and start-up cost, then ``run.max_steps`` is fitted to the budget (so the schedule ends
when the time does) with a checkpoint at each probe point, and ``run.time_limit_s`` holds the
budget when the calibration was optimistic."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ssl_dist.config import Config
from ssl_dist.data.stream import open_shards
from ssl_dist.train.checkpoint import STATE, TrainState, is_complete
from ssl_dist.train.driver import build_trainer, connect, pretrain, resolve_paths
from ssl_dist.train.parts import plan_steps

CHECKPOINTS = 4
"""Pretraining checkpoints per run (the probe curve's points after random init)."""
CALIBRATION_STEPS = 12
"""Steps of the calibration run: 5 warm-up steps (not timed by the loop) + 7 timed."""
CHECKPOINT_S = 1.5
"""Allowance per extra checkpoint when planning steps (DeepSpeed save + Ray persist)."""
FINAL_SAVE_S = 5.0
"""Seconds kept back from the budget for the last step and checkpoint after the time limit."""


@dataclass
class Calibration:
    step_s: float
    """Seconds per optimizer step after warm-up (the loop's own steady-state clock)."""
    startup_s: float
    """Seconds of a run outside its timed steps: worker start, warm-up, checkpoint, teardown."""
    wall_s: float
    steps: int


def _short_run(cfg: Config, steps: int, suffix: str) -> tuple[dict[str, Any], float]:
    """`steps` steps of `cfg` on Ray (tracking off, run ``<name>-<suffix>``): its final metrics
    and wall-clock seconds (Ray's own start not counted)."""
    c = cfg.model_copy(deep=True)
    c.tracking.enabled = False
    c.run.name = f"{cfg.run.name}-{suffix}"
    c.run.max_steps, c.run.checkpoint_every, c.run.log_every = steps, steps, steps
    c = resolve_paths(c)
    connect(c)
    start = time.perf_counter()
    metrics = build_trainer(c).fit().metrics or {}
    return metrics, time.perf_counter() - start


def warm_up(cfg: Config) -> None:
    """A throw-away one-step run of `cfg` (the caller times it). The first Ray run on a quiet
    machine starts up to three times slower than the next ones (measured: 90-97 s against 31-39 s
    for the recipe), so a calibration that ran first would plan every run with a start-up it
    does not pay, and end the schedule early."""
    _short_run(cfg, 1, "warmup")


def calibrate(cfg: Config, steps: int = CALIBRATION_STEPS) -> Calibration:
    """A short Ray run of `cfg` (tracking off, its own run name)."""
    metrics, wall = _short_run(cfg, steps, "calibration")
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

    def summary(self) -> dict[str, Any]:
        """The run in the bench's JSON (``pretrain_runs``)."""
        return {
            "method": self.method,
            "seed": self.cfg.run.seed,
            "run": self.cfg.run.name,
            "max_steps": self.max_steps,
            "last_step": self.points[-1].step,
            "wall_s": self.wall_s,
            "stopped_by_time_limit": self.stopped == "time_limit",
            "epochs": self.epochs,
            "mlflow": self.metrics.get("mlflow"),
        }

    def to_json(self) -> dict[str, Any]:
        """The whole run as JSON (a bench's journal); :meth:`from_json` reads it back."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["cfg"] = self.cfg.model_dump(mode="json")
        d["points"] = [{**asdict(pt), "path": pt.path and str(pt.path)} for pt in self.points]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Pretrained:
        points = [
            Point(pt["step"], pt["seconds"], pt["path"] and Path(pt["path"])) for pt in d["points"]
        ]
        return cls(**{**d, "cfg": Config.model_validate(d["cfg"]), "points": points})


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path, float]]:
    """``(step, dir, mtime of its train state)`` of every complete checkpoint, by step."""
    found = []
    for d in run_dir.glob("checkpoint_*"):
        if is_complete(d):
            found.append((TrainState.read(d).step, d, (d / STATE).stat().st_mtime))
    return sorted(found, key=lambda t: t[0])


def pretrain_for(
    cfg: Config, budget_s: float, cal: Calibration, checkpoints: int = CHECKPOINTS
) -> Pretrained:
    """Pretrain `cfg` on Ray for about `budget_s` seconds (through ``ssl-dist pretrain``'s
    driver: MLflow run, checkpoint artifacts, registered encoder)."""
    steps, every = plan_budget(budget_s, cal, checkpoints)
    c = cfg.model_copy(deep=True)
    c.run.max_steps, c.run.checkpoint_every = steps, every
    # The plan usually ends the schedule in time; the limit holds the budget when the
    # calibration was optimistic (a stop then leaves the schedule's tail unrun, reported).
    # A budget too small for the shortest run (start-up plus CHECKPOINTS steps) gets no limit:
    # it runs those steps.
    if steps > checkpoints:
        c.run.time_limit_s = budget_s - FINAL_SAVE_S
    c.run.num_to_keep = max(c.run.num_to_keep, checkpoints + 2)
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
    return Pretrained(
        c.method.name,
        c,
        points,
        wall,
        metrics,
        steps,
        steps * plan.global_batch / max(n_train, 1),
        TrainState.read(last).stopped if last else None,
    )


def with_seed(cfg: Config, seed: int) -> Config:
    """`cfg` with ``run.seed`` = `seed` and a run name that says so."""
    c = cfg.model_copy(deep=True)
    c.run.seed, c.run.name = seed, f"{cfg.run.name}-seed{seed}"
    return c


def pretrain_all(
    cfgs: dict[str, Config],
    budget_s: float,
    checkpoints: int,
    cals: dict[str, Calibration],
    phases: dict[str, float],
    say: Callable[[str], None] = print,
    done: Mapping[str, Pretrained] | None = None,
    on_done: Callable[[str, Pretrained, Calibration], None] = lambda key, p, cal: None,
) -> list[Pretrained]:
    """Each config in turn on Ray for `budget_s` (`cfgs`: a name for its phases -> config),
    except those in `done` (a resumed bench's finished runs, returned as they are); a method
    not in `cals` is calibrated first (and added); `on_done` is called after each run. Ray is
    shut down at the end."""
    done = done or {}
    runs: list[Pretrained] = []
    todo = [key for key in cfgs if key not in done]
    try:
        if todo and not cals:  # the first calibration of this bench must not pay a cold start
            say("warm-up: a one-step run before the first calibration")
            t = time.perf_counter()
            warm_up(cfgs[todo[0]])
            phases["warmup_s"] = time.perf_counter() - t
        for key, cfg in cfgs.items():
            if key in done:
                say(f"{key}: pretrained by an earlier part of this bench (resumed)")
                runs.append(done[key])
                continue
            m = cfg.method.name
            if m not in cals:
                say(f"{m}: calibrating ({CALIBRATION_STEPS} steps)")
                t = time.perf_counter()
                cals[m] = calibrate(cfg)
                phases[f"{m}_calibrate_s"] = time.perf_counter() - t
            steps, _ = plan_budget(budget_s, cals[m], checkpoints)
            say(
                f"{key}: {cals[m].step_s * 1e3:.0f} ms/step, start-up {cals[m].startup_s:.0f}s "
                f"-> {steps} steps in {budget_s / 60:g} min"
            )
            t = time.perf_counter()
            runs.append(pretrain_for(cfg, budget_s, cals[m], checkpoints))
            phases[f"{key}_pretrain_s"] = time.perf_counter() - t
            on_done(key, runs[-1], cals[m])
    finally:
        import ray  # heavy (seconds); connect() started it

        if ray.is_initialized():
            ray.shutdown()
    return runs
