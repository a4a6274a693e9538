"""The ImageNet recipes' models, built at a small input size, take one training step on CPU
through the recipe's own engine settings (optimizer, ZeRO stage, bf16 autocast) and the step
loop, fed fp32 views as the workers feed them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ssl_dist.config import load_config
from ssl_dist.dist.spawn import run_world

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["imagenet-simclr-r50.yaml", "imagenet-mocov3-vits.yaml"]
SIZE, BATCH = 32, 4
SMALL = [
    f"data.image_size={SIZE}",
    f"data.batch_size={BATCH}",
    "model.sync_bn=false",  # SyncBatchNorm needs CUDA
    "scaling.num_workers=1",
]


def _one_step(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    from ssl_dist.dist import zero
    from ssl_dist.train.parts import build_model
    from ssl_dist.train.runtime import DeepSpeedBackend, Position, Recorder, Schedule, run_steps

    out: dict[str, Any] = {}
    for name in names:
        cfg = load_config(ROOT / "launch" / "recipes" / name, SMALL)
        torch.manual_seed(0)
        method = build_model(cfg)
        before = {k: v.detach().clone() for k, v in method.encoder.state_dict().items()}
        engine = zero.build_engine(method, cfg.zero, cfg.optim, BATCH, world_size, lr=0.01)
        gen = torch.Generator().manual_seed(0)
        views = tuple(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen) for _ in range(2))
        recorder = Recorder()
        run_steps(
            DeepSpeedBackend(engine),
            lambda batch, seed: batch,
            lambda epoch, views=views: [views],
            Schedule(total_steps=1, peak_lr=0.01),
            Position(),
            [recorder],
            images_of=lambda batch: BATCH,
        )
        after = method.encoder.state_dict()
        out[name] = {
            "loss": recorder.losses,
            "dtypes": sorted({str(p.dtype) for p in method.parameters()}),
            "moved": sum(not torch.equal(before[k], after[k]) for k in before),
            "optimizer": type(engine.optimizer).__name__,
        }
    return out


@pytest.fixture(scope="module")
def stepped() -> dict[str, Any]:
    return run_world(_one_step, 1, RECIPES, timeout=540)[0]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_takes_a_bf16_step(stepped, name: str) -> None:
    cfg = load_config(ROOT / "launch" / "recipes" / name, SMALL)
    assert cfg.zero.precision == "bf16"
    out = stepped[name]
    assert len(out["loss"]) == 1 and math.isfinite(out["loss"][0])
    assert out["dtypes"] == ["torch.float32"]  # autocast: the weights stay fp32
    assert out["moved"] > 0
    if cfg.optim.name == "lars":
        assert out["optimizer"] == "Lars"  # the client optimizer itself at ZeRO 0
