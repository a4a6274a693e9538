"""Momentum targets under DeepSpeed ZeRO 0-3, resume and re-sharding, in real gloo worlds:
BYOL (target encoder + projector) and DINO (teacher encoder + head, and its centre buffer).

The method itself (thin ResNet, heads and the frozen target copies) goes through
``zero.build_engine``: each rank of a world of 2 trains on its slice of a fixed global batch,
the target moves by ``zero.momentum_update`` (its parameters gathered under ZeRO-3; DINO's
centre is all-reduced there), the engine saves at step N, and a second engine built from another
initialisation loads the checkpoint and trains the last N steps. The reference is plain torch in
one process on the global batch with the same optimizer and EMA. BatchNorm runs on running
statistics (as in ``test_methods_dist``) so that splitting the batch over ranks does not change
the features. Elastic resize: a world of 3 loads the ZeRO 1-3 checkpoints of the world of 2
(``zero.load(..., reshard=True)``) and trains the last N steps on the same global batches.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from ssl_dist.config import OptimConfig, ZeroConfig
from ssl_dist.dist.spawn import run_world
from ssl_dist.methods import SSLMethod
from ssl_dist.optim import build_optimizer, lr_at, param_groups
from tests.dist.test_methods_dist import SPECS, _build, _inputs

WORLD, RESHARD_WORLD = 2, 3
WORLD_TIMEOUT_S = 400  # the first DeepSpeed engine on a fresh machine JIT-compiles an op
# The module's worlds run in the first test's setup: pytest's limit is their timeouts added up.
pytestmark = [pytest.mark.dist, pytest.mark.timeout(2 * WORLD_TIMEOUT_S + 30)]
GLOBAL, N = 6, 2  # images per step (3 per rank at 2 ranks, 2 at 3); steps before the checkpoint
TOTAL, PEAK_LR = 2 * N, 0.2
ATOL = 2e-5  # float32: the world sums gradients in another order than one process
TARGETS = {
    "byol": ("momentum_encoder.", "momentum_projector."),
    "dino": ("momentum_encoder.", "momentum_head.", "center"),
}
"""The state each method's target holds (prefixes of its state-dict keys)."""

CASES: dict[str, dict[str, Any]] = {
    "stage0": {"stage": 0},
    "stage1": {"stage": 1},
    "stage2": {"stage": 2},
    # Threshold 0 partitions every parameter, the target's too (tiny ones stay whole otherwise).
    "stage3-partitioned": {
        "stage": 3,
        "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    },
}
OPTIM = OptimConfig(name="sgd", weight_decay=0.01, momentum=0.9)
RUNS = {f"{name}-{case}": (name, CASES[case]) for name in TARGETS for case in CASES}
"""Every method under every stage, keyed ``byol-stage0``..."""
RESHARD = [key for key, (_, case) in RUNS.items() if case["stage"] in (2, 3)]
"""The runs whose checkpoints a world of 3 loads (stage 0 loads at any size without
re-sharding; stage 1 partitions like stage 2)."""


def _method(name: str, seed: int = 0) -> SSLMethod:
    """The method in float32 with randomised BN on running statistics and a target that differs
    from the online networks (``_build`` of the gloo method tests); `seed` changes the weights."""
    method = _build(SPECS[name], bn_eval=True).float()
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in method.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return method


def _batch(name: str, step: int, rows: slice = slice(None)) -> tuple[Tensor, ...]:
    """The forward arguments of `rows` of step `step`'s global batch (float32)."""
    return tuple(x.float() for x in _inputs(SPECS[name], step, GLOBAL, rows))


def _reference(name: str) -> dict[str, Tensor]:
    """One process, the global batch: the state after TOTAL steps."""
    method = _method(name)
    opt = build_optimizer(param_groups(method, OPTIM.weight_decay), OPTIM, PEAK_LR)
    for step in range(TOTAL):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, TOTAL, PEAK_LR, 0)
        opt.zero_grad()
        loss, _ = method(*_batch(name, step))
        loss.backward()
        opt.step()
        method.momentum_update(step + 1, TOTAL)
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _train(engine: Any, name: str, rank: int, world_size: int, steps: range) -> None:
    from ssl_dist.dist import zero

    micro = GLOBAL // world_size
    rows = slice(rank * micro, (rank + 1) * micro)
    for step in steps:
        zero.set_lr(engine, lr_at(step, TOTAL, PEAK_LR, 0))
        loss, _ = engine(*_batch(name, step, rows))
        engine.backward(loss)
        engine.step()
        zero.momentum_update(engine.module, step + 1, TOTAL)


def _engine(name: str, case: dict[str, Any], world_size: int, seed: int) -> Any:
    from ssl_dist.dist import zero

    cfg = ZeroConfig(stage=case["stage"], precision="fp32")
    method = _method(name, seed)
    micro = GLOBAL // world_size
    return zero.build_engine(method, cfg, OPTIM, micro, world_size, PEAK_LR, case.get("extra"))


def _world(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from ssl_dist.dist import zero

    results: dict[str, Any] = {}
    for key, (name, case) in RUNS.items():
        directory = str(Path(root) / key)
        engine = _engine(name, case, world_size, seed=0)
        _train(engine, name, rank, world_size, range(N))
        at_save = zero.consolidated_state_dict(engine)
        zero.save(engine, directory, {"step": N})
        _train(engine, name, rank, world_size, range(N, TOTAL))
        trained = zero.consolidated_state_dict(engine)
        resumed = _engine(name, case, world_size, seed=7)
        loaded = zero.load(resumed, directory)
        restored = zero.consolidated_state_dict(resumed)
        _train(resumed, name, rank, world_size, range(N, TOTAL))
        results[key] = {
            "client": loaded,
            "at_save": at_save,
            "restored": restored,
            "trained": trained,
            "resumed": zero.consolidated_state_dict(resumed),
        }
    return results if rank == 0 else {}


def _reshard_world(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Load the world of 2's ZeRO 1-3 checkpoints at another size (re-partitioned), then train
    the last N steps on the same global batches."""
    from ssl_dist.dist import zero

    results: dict[str, Any] = {}
    for key in RESHARD:
        name, case = RUNS[key]
        engine = _engine(name, case, world_size, seed=7)
        loaded = zero.load(engine, str(Path(root) / key), reshard=True)
        restored = zero.consolidated_state_dict(engine)
        _train(engine, name, rank, world_size, range(N, TOTAL))
        results[key] = {
            "client": loaded,
            "restored": restored,
            "resumed": zero.consolidated_state_dict(engine),
        }
    return results if rank == 0 else {}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("momentum-zero"))
    two = run_world(_world, WORLD, root, timeout=WORLD_TIMEOUT_S)[0]
    three = run_world(_reshard_world, RESHARD_WORLD, root, timeout=WORLD_TIMEOUT_S)[0]
    return {"two": two, "three": three}


@functools.cache
def _reference_of(name: str) -> dict[str, Tensor]:
    return _reference(name)


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor], prefix: tuple[str, ...] = ("",)) -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def _rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest ``|a - b| / (1 + |b|)``: float32 round-off is relative, and SGD at this learning
    rate drives DINO's head biases to thousands (the gradient through the L2-normalised
    bottleneck scales with 1 / its norm, which starts small)."""
    assert a and sorted(a) == sorted(b)
    return max(
        ((a[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max().item() for k in a
    )


@pytest.mark.parametrize("key", list(RUNS))
def test_under_zero_matches_one_process_on_the_global_batch(worlds, key: str) -> None:
    name, _ = RUNS[key]
    trained, reference = worlds["two"][key]["trained"], _reference_of(name)
    assert _rel_diff(trained, reference) <= ATOL
    # The target followed its EMA: it moved from the initial copy, and is not the online net.
    init = _method(name).state_dict()
    assert _max_diff(trained, init, TARGETS[name]) > 1e-4
    online = {
        k.replace("momentum_", ""): v for k, v in trained.items() if k.startswith("momentum_")
    }
    assert online and any(not torch.equal(v, trained[k]) for k, v in online.items())


@pytest.mark.parametrize("key", list(RUNS))
def test_target_survives_save_and_resume(worlds, key: str) -> None:
    name, _ = RUNS[key]
    out = worlds["two"][key]
    assert out["client"] == {"step": N}
    # Loaded into an engine built from other weights: every tensor, the target's (and DINO's
    # centre) included, is the saved one; the last N steps then end where the uninterrupted
    # run did.
    assert _max_diff(out["restored"], out["at_save"]) == 0.0
    assert _max_diff(out["restored"], out["trained"], TARGETS[name]) > 1e-5
    assert _rel_diff(out["resumed"], out["trained"]) <= 1e-6
    if name == "dino":  # the fresh engine's centre was zero: this one was loaded
        assert float(out["restored"]["center"].abs().max()) > 1e-3
        assert int(out["restored"]["steps_done"]) == N


@pytest.mark.parametrize("key", RESHARD)
def test_target_carries_over_to_another_world_size(worlds, key: str) -> None:
    """Saved by 2 ranks, loaded by 3 (re-sharded): target, centre and online weights exactly the
    saved ones; the last N steps end where the world of 2 did."""
    name, _ = RUNS[key]
    out, saved = worlds["three"][key], worlds["two"][key]
    assert out["client"] == {"step": N}
    assert _max_diff(out["restored"], saved["at_save"]) == 0.0
    assert _max_diff(out["restored"], saved["trained"], TARGETS[name]) > 1e-5
    assert _rel_diff(out["resumed"], saved["trained"]) <= ATOL
