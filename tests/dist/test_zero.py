"""DeepSpeed ZeRO engines in a real gloo world of 2 against plain single-process torch.

One spawned world runs every case (DeepSpeed's import and first engine cost seconds per process);
the tests below check its results. Each case trains a tiny MLP with a frozen momentum copy (as in
MoCo: the copy feeds the output under ``no_grad`` and follows the online network by EMA) for
``2 * N`` optimizer steps with a scheduled learning rate and momentum, saving at step N; a second
engine built from a different initialisation loads that checkpoint and trains the last N steps.

The reference is plain torch on one process: the concatenated global batch, the same optimizer
and the same EMA. The loss is a per-sample mean, so the global gradient is the mean of the ranks'
gradients, which is what DeepSpeed's gradient averaging produces.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ssl_dist.config import OptimConfig, ZeroConfig
from ssl_dist.dist.gather import is_partitioned
from ssl_dist.dist.spawn import run_world
from ssl_dist.models import cosine_momentum, ema_update, make_momentum_copy
from ssl_dist.optim import build_optimizer, lr_at, param_groups

WORLD = 2
WORLD_TIMEOUT_S = 400  # the first DeepSpeed engine on a fresh machine JIT-compiles an op (~80 s)
# The world runs in the first test's setup: pytest's limit is the world's own timeout.
pytestmark = [pytest.mark.dist, pytest.mark.timeout(WORLD_TIMEOUT_S + 30)]
MICRO = 3  # samples per rank per micro-batch
N = 2  # steps before the checkpoint; runs train 2 * N steps
TOTAL = 2 * N
PEAK_LR, WARMUP = 0.2, 0
M_BASE, M_FINAL = 0.6, 0.95
DIM_IN, HIDDEN, DIM_OUT = 5, 7, 3
ATOL = 1e-5
BF16_ATOL = 5e-2

CASES: dict[str, dict[str, Any]] = {
    "stage0-sgd": {"stage": 0, "optim": "sgd"},
    "stage0-lars": {"stage": 0, "optim": "lars"},
    "stage1-adamw-accum2": {"stage": 1, "optim": "adamw", "grad_accum": 2},
    "stage2-sgd-offload": {"stage": 2, "optim": "sgd", "offload": True},
    # Tiny parameters are "persistent" under ZeRO-3 by default (kept whole after forward);
    # threshold 0 partitions all of them, so both ZeRO-3 code paths are exercised.
    "stage3-sgd": {"stage": 3, "optim": "sgd"},
    "stage3-adamw-partitioned": {
        "stage": 3,
        "optim": "adamw",
        "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    },
    # bf16 = autocast with fp32 weights, optimizer state and momentum copy (inputs stay fp32).
    "stage0-bf16": {"stage": 0, "optim": "sgd", "precision": "bf16"},
    "stage2-bf16": {"stage": 2, "optim": "sgd", "precision": "bf16"},
    "stage3-bf16-partitioned": {
        "stage": 3,
        "optim": "adamw",
        "precision": "bf16",
        "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    },
}
EMA_M, EMA_STEPS = 0.999, 6  # the fp32-EMA check under bf16: MoCo's momentum, K updates


class TinyMoCo(nn.Module):
    """Online MLP plus a frozen momentum copy, with the method interface ``zero`` expects."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.online = nn.Sequential(
            nn.Linear(DIM_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM_OUT)
        )
        self.target = make_momentum_copy(self.online)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            key = self.target(x)
        return self.online(x) + 0.5 * key

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target, self.online)]

    def momentum_update(self, step: int, total_steps: int) -> float:
        m = cosine_momentum(step, total_steps, M_BASE, M_FINAL)
        ema_update(self.target, self.online, m)
        return m


def _optim_cfg(case: dict[str, Any]) -> OptimConfig:
    return OptimConfig(
        name=case["optim"], weight_decay=0.01, momentum=0.9, grad_accum=case.get("grad_accum", 1)
    )


def _zero_cfg(case: dict[str, Any]) -> ZeroConfig:
    return ZeroConfig(
        stage=case["stage"],
        precision=case.get("precision", "fp32"),
        offload_optimizer=case.get("offload", False),
    )


def _batch(step: int, size: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, DIM_IN, generator=generator), torch.randn(
        size, DIM_OUT, generator=generator
    )


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return (out.float() - y).pow(2).sum(dim=1).mean()  # per-sample mean


def _lr(step: int) -> float:
    return lr_at(step, TOTAL, PEAK_LR, WARMUP)


def _reference(case: dict[str, Any]) -> dict[str, Tensor]:
    """Plain torch, one process, global batch: the state after TOTAL steps."""
    model = TinyMoCo()
    cfg = _optim_cfg(case)
    opt = build_optimizer(param_groups(model, cfg.weight_decay), cfg, PEAK_LR)
    global_batch = MICRO * WORLD * cfg.grad_accum
    for step in range(TOTAL):
        for group in opt.param_groups:
            group["lr"] = _lr(step)
        x, y = _batch(step, global_batch)
        opt.zero_grad()
        _loss(model(x), y).backward()
        opt.step()
        model.momentum_update(step + 1, TOTAL)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(engine: Any, rank: int, steps: range, accum: int, ema_errors: list[float]) -> None:
    from ssl_dist.dist import zero

    module = engine.module
    for step in steps:
        zero.set_lr(engine, _lr(step))
        x, y = _batch(step, MICRO * WORLD * accum)
        for micro in range(accum):
            rows = slice((micro * WORLD + rank) * MICRO, (micro * WORLD + rank + 1) * MICRO)
            loss = _loss(engine(x[rows]), y[rows])  # fp32 inputs under every precision
            engine.backward(loss)
            engine.step()
        assert engine.global_steps == step + 1
        with zero.gathered(module.parameters()):
            online = [p.detach().float().clone() for p in module.online.parameters()]
            before = [p.detach().float().clone() for p in module.target.parameters()]
        m = zero.momentum_update(module, step + 1, TOTAL)
        with zero.gathered(module.target.parameters()):
            after = [p.detach().float().clone() for p in module.target.parameters()]
        expected = [m * t + (1 - m) * o for t, o in zip(before, online, strict=True)]
        ema_errors.append(
            max((a - e).abs().max().item() for a, e in zip(after, expected, strict=True))
        )


class SlowMoCo(TinyMoCo):
    """TinyMoCo at MoCo's constant momentum 0.999 (increments below bf16's resolution)."""

    def momentum_update(self, step: int, total_steps: int) -> float:
        ema_update(self.target, self.online, EMA_M)
        return EMA_M


def _ema_against_fp32(rank: int, world_size: int, case: dict[str, Any]) -> float | None:
    """Max relative distance, over EMA_STEPS steps, between the target and an fp32 EMA of the
    online weights (both read as the engine's full fp32 state); None on ranks other than 0."""
    from ssl_dist.dist import zero

    model = SlowMoCo()
    reference = {k: v.detach().clone() for k, v in model.online.state_dict().items()}
    engine = zero.build_engine(
        model, _zero_cfg(case), _optim_cfg(case), MICRO, world_size, PEAK_LR, case.get("extra")
    )
    worst = 0.0
    for step in range(EMA_STEPS):
        _train(engine, rank, range(step, step + 1), 1, [])
        full = zero.consolidated_state_dict(engine)
        if full is None:
            continue
        for name, ref in reference.items():
            ref.mul_(EMA_M).add_(full[f"online.{name}"], alpha=1 - EMA_M)
            error = (full[f"target.{name}"] - ref).abs().max() / ref.abs().max()
            worst = max(worst, float(error))
    return worst if rank == 0 else None


def _world(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from ssl_dist.dist import memory, zero

    results: dict[str, Any] = {}
    results["ema_vs_fp32"] = {
        name: _ema_against_fp32(rank, world_size, case)
        for name, case in CASES.items()
        if case.get("precision") == "bf16"
    }
    for name, case in CASES.items():
        zero_cfg, optim_cfg = _zero_cfg(case), _optim_cfg(case)
        accum = optim_cfg.grad_accum
        directory = str(Path(root) / name)
        out: dict[str, Any] = {"ema_errors": []}

        model = TinyMoCo()
        engine = zero.build_engine(
            model, zero_cfg, optim_cfg, MICRO, world_size, PEAK_LR, case.get("extra")
        )
        out["frozen_partitioned"] = all(is_partitioned(p) for p in model.target.parameters())
        out["frozen_in_optimizer"] = any(
            p is q for g in optim_param_groups(engine) for p in g for q in model.target.parameters()
        )
        _train(engine, rank, range(N), accum, out["ema_errors"])
        out["at_save"] = zero.consolidated_state_dict(engine)
        out["tag"] = zero.save(engine, directory, {"step": N, "note": name})
        _train(engine, rank, range(N, TOTAL), accum, out["ema_errors"])
        out["lr"] = [float(g["lr"]) for g in engine.optimizer.param_groups]
        out["state_bytes"] = memory.state_bytes(engine)
        out["formula_bytes"] = memory.zero_formula_bytes(model, zero_cfg.stage, world_size)
        out["trained"] = zero.consolidated_state_dict(engine)

        resumed_model = TinyMoCo(seed=1)  # different weights: the load must replace them all
        resumed = zero.build_engine(
            resumed_model, zero_cfg, optim_cfg, MICRO, world_size, PEAK_LR, case.get("extra")
        )
        out["client_state"] = zero.load(resumed, directory)
        out["loaded_steps"] = resumed.global_steps
        _train(resumed, rank, range(N, TOTAL), accum, out["ema_errors"])
        out["resumed"] = zero.consolidated_state_dict(resumed)
        if rank != 0:
            out = {k: v for k, v in out.items() if v is not None}
        results[name] = out
    return results


def optim_param_groups(engine: Any) -> list[list[Tensor]]:
    """The parameters the CLIENT optimizer was built with (before DeepSpeed flattened them)."""
    return [list(g["params"]) for g in engine.client_optimizer.param_groups]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    root = tmp_path_factory.mktemp("zero")
    return run_world(_world, WORLD, str(root), timeout=WORLD_TIMEOUT_S), root


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", list(CASES))
def test_training_matches_single_process_global_batch(world, name: str) -> None:
    results, _ = world
    case, out = CASES[name], results[0][name]
    atol = BF16_ATOL if case.get("precision") == "bf16" else ATOL
    reference = _reference(case)
    trained = out["trained"]
    assert sorted(trained) == sorted(reference)
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert _max_diff(trained, reference) <= atol
    # The learning rate set by set_lr is the one DeepSpeed's step used (checked above) and reads
    # back from the wrapped optimizer.
    assert out["lr"] == pytest.approx([_lr(TOTAL - 1)] * len(out["lr"]))
    assert not out["frozen_in_optimizer"]


@pytest.mark.parametrize("name", list(CASES))
def test_resume_from_checkpoint_matches_uninterrupted_run(world, name: str) -> None:
    results, _ = world
    out = results[0][name]
    assert out["client_state"] == {"step": N, "note": name}
    assert results[1][name]["client_state"] == {"step": N, "note": name}
    assert out["loaded_steps"] == N
    assert _max_diff(out["resumed"], out["trained"]) <= 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_consolidated_state_dict_only_on_rank_zero(world, name: str) -> None:
    results, _ = world
    assert "trained" not in results[1][name] and "at_save" not in results[1][name]
    full = results[0][name]["trained"]
    expected = TinyMoCo().state_dict()
    assert {k: tuple(v.shape) for k, v in full.items()} == {
        k: tuple(v.shape) for k, v in expected.items()
    }


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_from_checkpoint_files(world, name: str) -> None:
    from ssl_dist.dist.checkpoint_files import state_dict_from_checkpoint

    results, root = world
    offline = state_dict_from_checkpoint(root / name)
    assert _max_diff(offline, results[0][name]["at_save"]) <= 1e-7


@pytest.mark.parametrize("name", list(CASES))
def test_momentum_ema_is_exact_on_every_rank(world, name: str) -> None:
    results, _ = world
    for rank in range(WORLD):
        errors = results[rank][name]["ema_errors"]
        assert len(errors) == TOTAL + N
        assert max(errors) <= 1e-6, errors


BF16_CASES = [n for n, c in CASES.items() if c.get("precision") == "bf16"]


@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_momentum_encoder_follows_an_fp32_ema(world, name: str) -> None:
    # Under bf16 the target moves by (1 - 0.999) * (online - target) per step, below bf16's
    # resolution for most weights: only an fp32 momentum copy follows the fp32 reference EMA.
    results, _ = world
    assert results[0]["ema_vs_fp32"][name] <= 1e-6


class _StubEngine:
    """Just what :func:`zero.load` reads before it hands over to DeepSpeed."""

    def __init__(self, stage: int, dp_world_size: int) -> None:
        self.stage, self.dp_world_size = stage, dp_world_size

    def zero_optimization_stage(self) -> int:
        return self.stage

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("load must refuse before DeepSpeed reads the checkpoint")


@pytest.mark.parametrize("name", ["stage1-adamw-accum2", "stage3-sgd"])
def test_load_refuses_zero_checkpoint_from_another_world_size(world, name: str) -> None:
    from ssl_dist.dist import zero

    _, root = world
    engine = _StubEngine(CASES[name]["stage"], dp_world_size=WORLD + 1)
    with pytest.raises(ValueError, match=f"saved by {WORLD} ranks"):
        zero.load(engine, root / name)  # type: ignore[arg-type]


def test_load_without_checkpoint_raises(tmp_path: Path) -> None:
    from ssl_dist.dist import zero

    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        zero.load(_StubEngine(0, 1), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint 'step9'"):
        zero.load(_StubEngine(0, 1), tmp_path, tag="step9")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(CASES))
def test_state_bytes_follow_the_zero_formula(world, name: str) -> None:
    # fp32: the measured parameter + optimizer bytes of a rank are the ZeRO paper's (SGD with
    # momentum) plus AdamW's second moment, up to partition padding and AdamW's step counters.
    results, _ = world
    case = CASES[name]
    trainable = sum(p.numel() for p in TinyMoCo().online.parameters())
    partitions = WORLD if case["stage"] else 1
    second_moment = 4 * trainable // partitions if case["optim"] == "adamw" else 0
    for rank in range(WORLD):
        out = results[rank][name]
        expected = out["formula_bytes"] + second_moment
        assert expected <= out["state_bytes"] <= expected + 64, (rank, out["state_bytes"])


def test_zero3_partitions_frozen_momentum_encoder(world) -> None:
    results, _ = world
    for name, case in CASES.items():
        assert results[0][name]["frozen_partitioned"] is (case["stage"] == 3), name


# --- Without a world ----------------------------------------------------------------------------


def test_deepspeed_config_fields() -> None:
    from ssl_dist.dist.zero import deepspeed_config

    optim = OptimConfig(grad_accum=4, grad_clip=0.0)
    cfg = deepspeed_config(ZeroConfig(stage=2, precision="fp32"), optim, 8, world_size=3)
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 8 * 4 * 3
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["gradient_clipping"] == 0.0  # DeepSpeed's own default would clip to 1.0
    assert cfg["zero_allow_untested_optimizer"] is True
    assert cfg["wall_clock_breakdown"] is False
    assert not {"bf16", "fp16", "torch_autocast"} & set(cfg)

    cfg = deepspeed_config(
        ZeroConfig(stage=3, precision="bf16", offload_optimizer=True),
        OptimConfig(grad_clip=1.5),
        micro_batch=2,
        world_size=1,
        extra={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    # bf16 is autocast (fp32 weights), not DeepSpeed's bf16 mode that casts the module.
    assert "bf16" not in cfg
    assert cfg["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],
    }
    assert cfg["gradient_clipping"] == 1.5
    assert cfg["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "stage3_param_persistence_threshold": 0,
    }
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ValueError, match="resolved first"):
        deepspeed_config(ZeroConfig(precision="auto"), OptimConfig(), 1, 1)
    with pytest.raises(ValueError, match="fp16 is not supported"):
        ZeroConfig(precision="fp16")


def test_deepspeed_config_rejects_bad_values() -> None:
    from ssl_dist.dist.zero import deepspeed_config

    with pytest.raises(ValueError, match="at least 1"):
        deepspeed_config(ZeroConfig(), OptimConfig(), micro_batch=0, world_size=2)
    with pytest.raises(ValueError, match="offload_optimizer needs ZeRO stage"):
        deepspeed_config(ZeroConfig(stage=0, offload_optimizer=True), OptimConfig(), 1, 1)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lars_under_zero_partitioning_is_refused(stage: int) -> None:
    from ssl_dist.dist.zero import build_engine

    with pytest.raises(ValueError, match="lars needs zero.stage=0"):
        build_engine(nn.Linear(2, 2), ZeroConfig(stage=stage), OptimConfig(name="lars"), 1, 1, 0.1)


def test_build_engine_needs_a_process_group() -> None:
    from ssl_dist.dist.zero import build_engine

    with pytest.raises(RuntimeError, match="process group"):
        build_engine(nn.Linear(2, 2), ZeroConfig(), OptimConfig(name="sgd"), 1, 1, 0.1)


def test_lr_schedule_used_by_cases_varies() -> None:
    # Guards the learning-rate check above against a schedule that happens to be constant.
    lrs = [_lr(s) for s in range(TOTAL)]
    assert len(set(lrs)) == TOTAL and not math.isclose(lrs[0], lrs[-1])
