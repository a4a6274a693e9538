"""Checkpoint contents beside DeepSpeed's shards: train state and RNG states.

Layout of one checkpoint directory (every rank writes its own DeepSpeed files into it)::

    deepspeed/            engine.save_checkpoint: model, optimizer shards, MoCo queue buffers
    train_state.json      step, epoch, batch in epoch, world size it was saved with (and its
                          history), run id slot
    encoder.safetensors   the encoder artifact (:mod:`ssl_dist.artifact`): fp32 online encoder,
    config.yaml           consolidated on rank 0, and the resolved run config
    rng-rank{r}.safetensors   each rank's torch RNG state

A checkpoint is complete only when `train_state.json` is there; it is written last, by rank 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ssl_dist.atomic import write_atomic

STATE = "train_state.json"
DEEPSPEED_DIR = "deepspeed"


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch in progress."""
    batch_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed (the stream position)."""
    world_size: int = 1
    """World size the checkpoint was written with."""
    mlflow_run_id: str | None = None
    """The tracking run this training belongs to (kept across restarts)."""
    resumed_at: list[int] = field(default_factory=list)
    """Steps from which this run was resumed (restarts after failures, continued runs)."""
    world_sizes: list[list[int]] = field(default_factory=list)
    """``[step, world size]`` at the start and wherever the world size changed (elastic runs);
    the first entry's size fixes the run's step plan (and, under ``keep_global_batch``, its
    global batch)."""
    stopped: str | None = None
    """Why the run stopped at this checkpoint before its last step: ``time_limit``,
    ``preempted`` or ``stop_at_step``; None for periodic and final checkpoints."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, directory: Path) -> TrainState:
        return cls(**json.loads((Path(directory) / STATE).read_text()))


PROGRESS = "progress.json"
"""Last step reached, kept by rank 0 in the run directory (local or shared storage only)."""


def write_progress(run_dir: Path, step: int) -> None:
    if run_dir.is_dir():
        write_atomic(run_dir / PROGRESS, json.dumps({"step": step}))


def read_progress(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / PROGRESS).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def save_rng(directory: Path, rank: int) -> None:
    """This rank's torch RNG state (shuffle-BN permutations draw from it)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    write_atomic(Path(directory) / rng_file(rank), save(state))


def load_rng(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG state if the checkpoint has one for it (same world size)."""
    path = Path(directory) / rng_file(rank)
    if not path.is_file():
        return False
    state = load_file(str(path))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def is_complete(directory: Path) -> bool:
    return (Path(directory) / STATE).is_file() and (Path(directory) / DEEPSPEED_DIR).is_dir()
