"""`pretrain` on Ray with ``zero.precision=bf16`` (autocast, fp32 weights) against fp32.

The workers are fed fp32 views, as always; under bf16 the engine autocasts the forward. On a CPU
without native bf16 the bf16 kernels are emulated (slow), so the runs stay tiny: the tiny recipe,
3 steps, 2 workers. ZeRO stages change no arithmetic (tests/dist/test_zero.py, which also
checks bf16 at stages 0, 2 and 3 against one process), so one fp32 run per method is the
reference for its bf16 run, and each method runs at one stage here: 0, 2 and 3 between them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssl_dist.artifact import ENCODER, read_weights
from ssl_dist.train.checkpoint import STATE
from ssl_dist.train.driver import pretrain

# Emulated bf16 (CPUs without AVX-512 BF16 / AMX) makes a MoCo run take minutes on 2 cores; a
# test here is up to two runs.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 3
LOSS_RTOL = 0.05
"""bf16 loss within 5% of the fp32 loss after the same steps (bf16 keeps ~3 significant digits
in the convolutions; the losses themselves are computed in fp32)."""

_fp32_loss: dict[str, float] = {}


def _run(tiny_cfg, method: str, stage: int, precision: str, *extra: str) -> tuple[Path, dict]:
    cfg = tiny_cfg(
        f"method.name={method}",
        f"zero.stage={stage}",
        f"zero.precision={precision}",
        f"run.max_steps={STEPS}",
        f"run.name={method}-z{stage}-{precision}",
        *extra,
    )
    path, metrics = pretrain(cfg)
    return Path(path), metrics


@pytest.mark.parametrize(
    ("method", "stage"),
    [("simclr", 0), ("moco_v2", 2), ("moco_v3", 3)],
)
def test_bf16_pretrain_matches_fp32(local_ray, tiny_cfg, method: str, stage: int) -> None:
    if method not in _fp32_loss:
        _, reference = _run(tiny_cfg, method, 0, "fp32")
        _fp32_loss[method] = reference["loss"]
    d, metrics = _run(tiny_cfg, method, stage, "bf16")
    state = json.loads((d / STATE).read_text())
    assert state["step"] == STEPS
    weights = read_weights(d / ENCODER)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    loss, reference = metrics["loss"], _fp32_loss[method]
    assert math.isfinite(loss)
    assert abs(loss - reference) <= LOSS_RTOL * abs(reference), (loss, reference)
    print(f"{method} ZeRO-{stage}: bf16 loss {loss:.5f}, fp32 {reference:.5f}")


@pytest.mark.parametrize("workers_after", [1])
def test_bf16_checkpoint_resumes(local_ray, tiny_cfg, workers_after: int) -> None:
    """A bf16 checkpoint (MoCo v2, ZeRO-2: queue, momentum encoder, partitioned optimizer)
    resumes at another world size (re-sharded; a resume at the same size is the fp32 tests'
    path with the same state)."""
    common = ("method.name=moco_v2", "zero.stage=2", "zero.precision=bf16", "run.max_steps=4")
    first, _ = _run(tiny_cfg, "moco_v2", 2, "bf16", *common, "run.stop_at_step=2")
    assert json.loads((first / STATE).read_text())["step"] == 2
    last, metrics = _run(
        tiny_cfg, "moco_v2", 2, "bf16", *common, f"scaling.num_workers={workers_after}"
    )
    state = json.loads((last / STATE).read_text())
    assert state["step"] == 4 and state["stopped"] is None
    assert state["resumed_at"] == [2]
    assert [size for _, size in state["world_sizes"]] == sorted({2, workers_after}, reverse=True)
    assert math.isfinite(metrics["loss"])
    halfway, final = read_weights(first / ENCODER), read_weights(last / ENCODER)
    assert any(not torch.equal(halfway[k], final[k]) for k in final)
