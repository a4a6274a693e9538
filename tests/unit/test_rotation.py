"""Rotation prediction on the task seam: its own inputs (four rotations of one view), its loss."""

from __future__ import annotations

import pytest
import torch

from ssl_dist.config import Config, MethodConfig
from ssl_dist.data.shards import Manifest
from ssl_dist.data.stream import Batch
from ssl_dist.methods import build_method
from ssl_dist.methods.rotation import ROTATIONS, RotationInputs
from tests.unit.test_methods import MODEL

pytestmark = pytest.mark.unit


def _manifest() -> Manifest:
    return Manifest.model_validate(
        {
            "source": "t",
            "classes": ["a"],
            "channels": 1,
            "image_size": [8, 8],
            "samples_per_shard": 1,
            "seed": 0,
            "mean": [0.5],
            "std": [0.25],
            "splits": {},
        }
    )


def test_inputs_are_the_four_rotations_of_one_view():
    cfg = Config.model_validate({"data": {"image_size": 8, "channels": 1}})
    method = build_method(MethodConfig(name="rotation"), MODEL, 1, 8)
    inputs = method.make_inputs(cfg, _manifest(), "cpu")
    assert isinstance(inputs, RotationInputs)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    x, y = inputs(Batch(images, torch.zeros(3, dtype=torch.long)), seed=7)
    assert (
        x.shape == (ROTATIONS * 3, 1, 8, 8) and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    )
    view = inputs.views.single(images, seed=7)  # the same seed: the same augmented view
    for k in range(ROTATIONS):
        assert torch.equal(x[3 * k : 3 * (k + 1)], torch.rot90(view, k, dims=(2, 3)))
    again, _ = inputs(Batch(images, torch.zeros(3, dtype=torch.long)), seed=7)
    assert torch.equal(again, x)


def test_loss_is_cross_entropy_over_rotations_and_moves_the_encoder():
    torch.manual_seed(0)
    method = build_method(MethodConfig(name="rotation"), MODEL, 3, 16)
    x = torch.randn(4 * ROTATIONS, 3, 16, 16)
    y = torch.arange(ROTATIONS).repeat_interleave(4)
    loss, metrics = method(x, y)
    logits = method.head(method.encoder(x))
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item())
    assert 0.0 <= metrics["rot_acc"].item() <= 1.0
    loss.backward()
    grads = [p.grad for p in method.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert method.momentum_pairs() == [] and method.momentum_update(1, 10) == 0.0
