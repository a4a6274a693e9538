"""ZeRO 1-3 checkpoints re-sharded for another world size, in real gloo worlds.

A reference world of 2 trains ``N`` steps, saves, and trains ``2 * M`` more. Its checkpoint is
then loaded by worlds of 1 and 3 ranks (``zero.load(..., reshard=True)``), which train the next
``M`` steps on the same global batches; the world of 3 saves again and a world of 2 loads that
("and back") and trains the last ``M`` steps. Compared with the reference, with a world-size
independent view (``_optimizer_state`` below / ``zero.consolidated_state_dict``):

* right after the load: module weights, the frozen momentum copy, the queue buffer, the step
  counters and the optimizer state (SGD momentum, AdamW moments and step) are the saved ones;
* after the next steps: parameters and optimizer state equal the un-resharded run's.

The loss is a per-sample mean, so splitting the global batch over 1, 2 or 3 ranks gives the same
averaged gradient, up to float32 summation order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.config import OptimConfig, ZeroConfig
from ssl_dist.dist.spawn import run_world
from ssl_dist.models import cosine_momentum, ema_update, make_momentum_copy
from ssl_dist.optim import lr_at

# The module's worlds run in the first test's setup: pytest's limit is their timeouts added up.
pytestmark = [pytest.mark.dist, pytest.mark.timeout(400 + 3 * 300)]

GLOBAL = 12  # samples per optimizer step, split over 1, 2 or 3 ranks
N, M = 2, 2  # steps before the first checkpoint; steps after each load
TOTAL = N + 2 * M
PEAK_LR = 0.2
DIM_IN, HIDDEN, DIM_OUT, QUEUE = 5, 7, 3, 4  # odd sizes: uneven partitions at 2 and 3 ranks
ATOL = 2e-6  # float32 summation order differs between world sizes

CASES: dict[str, dict[str, Any]] = {
    "stage1-sgd": {"stage": 1, "optim": "sgd"},
    "stage2-adamw": {"stage": 2, "optim": "adamw"},
    "stage2-sgd-offload": {"stage": 2, "optim": "sgd", "offload": True},
    # Threshold 0 partitions every parameter; the default keeps tiny ones whole ("persistent").
    "stage3-sgd-partitioned": {
        "stage": 3,
        "optim": "sgd",
        "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    },
    "stage3-adamw": {"stage": 3, "optim": "adamw"},
}


class QueueMoCo(nn.Module):
    """An MLP, its frozen momentum copy and a queue buffer that feeds the output (like MoCo v2's
    queue of keys, filled from the global batch so that it is the same on every rank)."""

    queue: Tensor
    queue_ptr: Tensor

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.online = nn.Sequential(
            nn.Linear(DIM_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM_OUT)
        )
        self.target = make_momentum_copy(self.online)
        self.register_buffer("queue", F.normalize(torch.randn(QUEUE, DIM_OUT), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            key = self.target(x) + self.queue.mean(0)
        return self.online(x) + 0.5 * key

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        ptr = int(self.queue_ptr)
        self.queue[ptr : ptr + keys.shape[0]] = F.normalize(keys, dim=1)
        self.queue_ptr.fill_((ptr + keys.shape[0]) % QUEUE)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target, self.online)]

    def momentum_update(self, step: int, total_steps: int) -> float:
        m = cosine_momentum(step, total_steps, 0.6, 0.95)
        ema_update(self.target, self.online, m)
        return m


def _batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL, DIM_IN, generator=generator)
    return x, torch.randn(GLOBAL, DIM_OUT, generator=generator)


def _engine(case: dict[str, Any], world_size: int, seed: int) -> Any:
    from ssl_dist.dist import zero

    optim = OptimConfig(name=case["optim"], weight_decay=0.01, momentum=0.9)
    # fp32 named: `auto` is bf16 on a CPU with native bf16 (AVX-512 BF16, AMX), beyond ATOL.
    offload = case.get("offload", False)
    cfg = ZeroConfig(stage=case["stage"], precision="fp32", offload_optimizer=offload)
    return zero.build_engine(
        QueueMoCo(seed), cfg, optim, GLOBAL // world_size, world_size, PEAK_LR, case.get("extra")
    )


def _train(engine: Any, rank: int, world_size: int, steps: range) -> None:
    from ssl_dist.dist import zero

    micro = GLOBAL // world_size
    for step in steps:
        zero.set_lr(engine, lr_at(step, TOTAL, PEAK_LR, 0))
        x, y = _batch(step)
        rows = slice(rank * micro, (rank + 1) * micro)
        loss = (engine(x[rows]) - y[rows]).pow(2).sum(dim=1).mean()
        engine.backward(loss)
        engine.step()
        zero.momentum_update(engine.module, step + 1, TOTAL)
        engine.module.enqueue(y[:2])


def _optimizer_state(engine: Any) -> dict[str, dict[str, Tensor]] | None:
    """The optimizer state per trainable parameter, whole, on rank 0 (``None`` elsewhere).

    ``{name: {key: tensor}}``: element-wise state (``momentum_buffer``, ``exp_avg``...) in the
    parameter's shape (float32, CPU), per-group scalars (AdamW's ``step``) as they are: a view
    independent of the world size. Every rank must call it (one all-reduce per state key). Each
    rank writes the pieces its flat partitions hold into a zero buffer of every parameter; the
    pieces of all ranks tile the parameters, so the sum over ranks is the whole state. The live
    layout is read through re-sharding's own helpers; the next steps matching the un-resharded
    run are what check that layout independently.
    """
    import torch.distributed as dist

    from ssl_dist.dist.reshard import _flat_groups, _is_partitioned_state, _pieces, _zero_optimizer

    module: nn.Module = engine.module
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    rank0 = dist.get_rank() == 0

    def copy(value: Any) -> Any:
        return value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else value

    base = _zero_optimizer(engine).optimizer
    names = {id(p): n for n, p in trainable}
    groups = _flat_groups(engine)
    local = {
        k for flat, _ in groups for k, v in base.state[flat].items() if _is_partitioned_state(v)
    }
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(local))
    keys = sorted({k for ks in every for k in ks})
    sizes = {n: getattr(p, "ds_numel", p.numel()) for n, p in trainable}
    offsets, total = {}, 0
    for n, size in sizes.items():
        offsets[n], total = total, total + size
    out: dict[str, dict[str, Tensor]] = {n: {} for n in sizes}
    pieces = _pieces(engine, names)
    for key in keys:
        buf = torch.zeros(total, dtype=torch.float32, device=groups[0][0].device)
        for piece in pieces:
            src = base.state[piece.flat].get(key)
            if src is not None:
                start = offsets[piece.name] + piece.full_start
                buf.narrow(0, start, piece.length).copy_(
                    src.narrow(0, piece.flat_start, piece.length)
                )
        dist.all_reduce(buf)  # every element is held by exactly one rank
        if rank0:
            for n, p in trainable:
                shape = getattr(p, "ds_shape", p.shape)
                out[n][key] = buf.narrow(0, offsets[n], sizes[n]).reshape(shape).cpu().clone()
    if not rank0:
        return None
    for flat, params in groups:
        scalars = {k: v for k, v in base.state[flat].items() if not _is_partitioned_state(v)}
        for p in params:
            out[names[id(p)]].update({k: copy(v) for k, v in scalars.items()})
    return out


def _snapshot(engine: Any) -> dict[str, Any] | None:
    """Module state and optimizer state on rank 0 (collectives: every rank calls it)."""
    from ssl_dist.dist import zero

    module = zero.consolidated_state_dict(engine)
    optim = _optimizer_state(engine)
    if module is None:
        return None
    return {"module": module, "optim": optim, "global_steps": engine.global_steps}


def _reference_world(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """World of 2: train N, save, train 2 M more; snapshots at N, N + M and N + 2 M."""
    from ssl_dist.dist import zero

    out: dict[str, Any] = {}
    for name, case in CASES.items():
        engine = _engine(case, world_size, seed=0)
        _train(engine, rank, world_size, range(N))
        zero.save(engine, Path(root) / name / "w2", {"step": N})
        snaps = {N: _snapshot(engine)}
        for end in (N + M, N + 2 * M):
            _train(engine, rank, world_size, range(end - M, end))
            snaps[end] = _snapshot(engine)
        out[name] = snaps
    return out if rank == 0 else {}


def _resumed_world(rank: int, world_size: int, root: str, source: str, start: int) -> dict:
    """Load `source` (written by another world size), snapshot, train M steps, snapshot; the
    world of 3 also saves for the way back."""
    from ssl_dist.dist import zero

    out: dict[str, Any] = {}
    for name, case in CASES.items():
        engine = _engine(case, world_size, seed=1)  # other weights: the load replaces them all
        client = zero.load(engine, Path(root) / name / source, reshard=True)
        loaded = _snapshot(engine)
        _train(engine, rank, world_size, range(start, start + M))
        trained = _snapshot(engine)
        if world_size == 3:
            zero.save(engine, Path(root) / name / "w3", {"step": start + M})
        out[name] = {"client": client, "loaded": loaded, "trained": trained}
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("reshard"))
    # Generous timeouts: the first DeepSpeed engine on a fresh machine JIT-compiles an op.
    reference = run_world(_reference_world, 2, root, timeout=400)[0]
    one = run_world(_resumed_world, 1, root, "w2", N, timeout=300)[0]
    three = run_world(_resumed_world, 3, root, "w2", N, timeout=300)[0]
    back = run_world(_resumed_world, 2, root, "w3", N + M, timeout=300)[0]
    return {"reference": reference, "1": one, "3": three, "back": back}


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert sorted(a) == sorted(b)
    return max(
        (a[k].float() - b[k].float()).abs().max().item() if isinstance(a[k], Tensor) else 0.0
        for k in a
    )


def _assert_close(got: dict[str, Any], want: dict[str, Any], atol: float) -> None:
    assert got["global_steps"] == want["global_steps"]
    assert _max_diff(got["module"], want["module"]) <= atol
    assert sorted(got["optim"]) == sorted(want["optim"])
    for param, state in want["optim"].items():
        assert sorted(got["optim"][param]) == sorted(state), param
        assert state, f"no optimizer state for {param}"
        assert _max_diff(got["optim"][param], state) <= atol, param


# (world that resumed, step of the checkpoint it loaded)
RESUMES = [("1", N), ("3", N), ("back", N + M)]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(("world", "start"), RESUMES)
def test_load_restores_the_saved_state_at_another_world_size(worlds, name, world, start) -> None:
    out, reference = worlds[world][name], worlds["reference"][name]
    assert out["client"] == {"step": start}
    # Copied, not recomputed: identical to what the reference held when (or, for the way back,
    # what the world of 3 held when) the checkpoint was written.
    saved = worlds["3"][name]["trained"] if world == "back" else reference[start]
    _assert_close(out["loaded"], saved, atol=0.0)
    assert torch.equal(out["loaded"]["module"]["queue"], reference[start]["module"]["queue"])
    assert int(out["loaded"]["module"]["queue_ptr"]) == (2 * start) % QUEUE


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(("world", "start"), RESUMES)
def test_next_steps_match_the_unresharded_run(worlds, name, world, start) -> None:
    out, reference = worlds[world][name], worlds["reference"][name]
    _assert_close(out["trained"], reference[start + M], atol=ATOL)
    # The run did move: the weights after the steps are not the loaded ones.
    assert _max_diff(out["trained"]["module"], out["loaded"]["module"]) > 1e-4


def test_adamw_step_counter_carries_over(worlds) -> None:
    state = worlds["3"]["stage2-adamw"]["loaded"]["optim"]
    assert all(int(s["step"]) == N for s in state.values())


def test_reference_optimizer_view_is_complete(worlds) -> None:
    # Guards the consolidated view the comparisons rely on: every trainable parameter, its
    # shape, and momentum that is not all zero.
    snap = worlds["reference"]["stage3-sgd-partitioned"][N]
    trainable = {k for k in snap["module"] if k.startswith("online.")}
    assert set(snap["optim"]) == trainable
    for name, state in snap["optim"].items():
        assert state["momentum_buffer"].shape == snap["module"][name].shape
        assert state["momentum_buffer"].abs().sum() > 0
