"""BYOL's momentum target under DeepSpeed ZeRO 0-3 and resume, in a real gloo world of 2.

The method itself (thin ResNet, projector, predictor and the frozen target copies) goes through
``zero.build_engine``: each rank trains on its slice of a fixed global batch, the target moves by
``zero.momentum_update`` (its parameters gathered under ZeRO-3), the engine saves at step N, and
a second engine built from another initialisation loads the checkpoint and trains the last N
steps. The reference is plain torch in one process on the global batch with the same optimizer
and EMA. BatchNorm runs on running statistics (as in ``test_methods_dist``) so that splitting
the batch over ranks does not change the features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from ssl_dist.config import OptimConfig, ZeroConfig
from ssl_dist.dist.spawn import run_world
from ssl_dist.methods import SSLMethod
from ssl_dist.optim import build_optimizer, lr_at, param_groups
from tests.dist.test_methods_dist import _build, _views

WORLD = 2
WORLD_TIMEOUT_S = 400  # the first DeepSpeed engine on a fresh machine JIT-compiles an op
pytestmark = [pytest.mark.dist, pytest.mark.timeout(WORLD_TIMEOUT_S + 30)]
MICRO, N = 3, 2  # images per rank; steps before the checkpoint (runs train 2 N)
TOTAL, PEAK_LR = 2 * N, 0.2
ATOL = 2e-5  # float32: the world sums gradients in another order than one process
TARGET = ("momentum_encoder.", "momentum_projector.")

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


def _method(seed: int = 0) -> SSLMethod:
    """BYOL in float32 with randomised BN on running statistics and a target that differs from
    the online networks (``_build`` of the gloo method tests); `seed` changes the weights."""
    method = _build({"name": "byol"}, bn_eval=True).float()
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in method.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return method


def _batch(step: int) -> tuple[Tensor, Tensor]:
    x1, x2 = _views(step, MICRO * WORLD)
    return x1.float(), x2.float()


def _reference() -> dict[str, Tensor]:
    """One process, the global batch: the state after TOTAL steps."""
    method = _method()
    opt = build_optimizer(param_groups(method, OPTIM.weight_decay), OPTIM, PEAK_LR)
    for step in range(TOTAL):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, TOTAL, PEAK_LR, 0)
        opt.zero_grad()
        loss, _ = method(*_batch(step))
        loss.backward()
        opt.step()
        method.momentum_update(step + 1, TOTAL)
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _train(engine: Any, rank: int, steps: range) -> None:
    from ssl_dist.dist import zero

    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    for step in steps:
        zero.set_lr(engine, lr_at(step, TOTAL, PEAK_LR, 0))
        x1, x2 = _batch(step)
        loss, _ = engine(x1[rows], x2[rows])
        engine.backward(loss)
        engine.step()
        zero.momentum_update(engine.module, step + 1, TOTAL)


def _world(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from ssl_dist.dist import zero

    results: dict[str, Any] = {}
    for name, case in CASES.items():
        cfg = ZeroConfig(stage=case["stage"], precision="fp32")
        directory = str(Path(root) / name)
        engine = zero.build_engine(
            _method(), cfg, OPTIM, MICRO, world_size, PEAK_LR, case.get("extra")
        )
        _train(engine, rank, range(N))
        at_save = zero.consolidated_state_dict(engine)
        zero.save(engine, directory, {"step": N})
        _train(engine, rank, range(N, TOTAL))
        trained = zero.consolidated_state_dict(engine)
        resumed = zero.build_engine(
            _method(seed=7), cfg, OPTIM, MICRO, world_size, PEAK_LR, case.get("extra")
        )
        loaded = zero.load(resumed, directory)
        restored = zero.consolidated_state_dict(resumed)
        _train(resumed, rank, range(N, TOTAL))
        results[name] = {
            "client": loaded,
            "at_save": at_save,
            "restored": restored,
            "trained": trained,
            "resumed": zero.consolidated_state_dict(resumed),
        }
    return results if rank == 0 else {}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("byol-zero")
    return run_world(_world, WORLD, str(root), timeout=WORLD_TIMEOUT_S)[0]


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor], prefix: tuple[str, ...] = ("",)) -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


@pytest.mark.parametrize("name", list(CASES))
def test_byol_under_zero_matches_one_process_on_the_global_batch(world, name: str) -> None:
    trained, reference = world[name]["trained"], _reference()
    assert _max_diff(trained, reference) <= ATOL
    # The target followed its EMA: it moved from the initial copy, and is not the online net.
    init = _method().state_dict()
    assert _max_diff(trained, init, TARGET) > 1e-4
    online = {k.replace("momentum_", ""): v for k, v in trained.items() if k.startswith(TARGET)}
    assert any(not torch.equal(v, trained[k]) for k, v in online.items())


@pytest.mark.parametrize("name", list(CASES))
def test_byol_target_survives_save_and_resume(world, name: str) -> None:
    out = world[name]
    assert out["client"] == {"step": N}
    # Loaded into an engine built from other weights: every tensor, the target's included, is
    # the saved one; the last N steps then end where the uninterrupted run did.
    assert _max_diff(out["restored"], out["at_save"]) == 0.0
    assert _max_diff(out["restored"], out["trained"], TARGET) > 1e-5
    assert _max_diff(out["resumed"], out["trained"]) <= 1e-6
