"""Rotation prediction on the task seam: its own inputs (four rotations of one view), its loss."""

from __future__ import annotations

import pytest
import torch

from ssl_dist.config import Config, MethodConfig
from ssl_dist.data.shards import Manifest
from ssl_dist.data.stream import Batch
from ssl_dist.methods import build_method
from ssl_dist.methods.rotation import ROTATIONS, RotationInputs, rotate_each
from ssl_dist.methods.simclr import RotatedPairInputs
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


def test_rotate_each_turns_every_image_by_its_own_count():
    x = torch.randn(5, 2, 6, 6)
    k = torch.tensor([0, 1, 2, 3, 1])
    out = rotate_each(x, k)
    for i in range(5):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(1, 2)))
    assert torch.equal(rotate_each(x, torch.zeros(5, dtype=torch.long)), x)


def test_simclr_rotation_inputs_turn_both_views_alike():
    cfg = Config.model_validate({"data": {"image_size": 8, "channels": 1}})
    plain = build_method(MethodConfig(name="simclr"), MODEL, 1, 8)
    method = build_method(MethodConfig(name="simclr", rotation_weight=0.5), MODEL, 1, 8)
    pairs = plain.make_inputs(cfg, _manifest(), "cpu")
    inputs = method.make_inputs(cfg, _manifest(), "cpu")
    assert isinstance(inputs, RotatedPairInputs) and not isinstance(pairs, RotatedPairInputs)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    batch = Batch(images, torch.zeros(64, dtype=torch.long))
    x1, x2, k = inputs(batch, seed=3)
    v1, v2 = pairs(batch, seed=3)  # the same seed: the same views, then turned
    assert torch.equal(x1, rotate_each(v1, k)) and torch.equal(x2, rotate_each(v2, k))
    assert set(k.tolist()) == set(range(ROTATIONS))  # 64 draws: every count turns up
    assert torch.equal(inputs(batch, seed=3)[2], k)  # seeded
    assert not torch.equal(inputs(batch, seed=4)[2], k)


def test_simclr_rotation_loss_adds_the_weighted_cross_entropy():
    torch.manual_seed(0)
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    k = torch.tensor([0, 1, 2, 3, 0, 1])
    method = build_method(MethodConfig(name="simclr", rotation_weight=0.5), MODEL, 3, 16)
    torch.manual_seed(0)
    plain = build_method(MethodConfig(name="simclr"), MODEL, 3, 16)
    plain.load_state_dict(method.state_dict(), strict=False)  # same encoder and projector
    method.eval(), plain.eval()  # BN on running stats: the two forwards see the same net
    loss, metrics = method(x1, x2, k)
    contrastive, _ = plain(x1, x2)
    logits = method.rotation_head(method.encoder(torch.cat([x1, x2])))
    ce = torch.nn.functional.cross_entropy(logits, torch.cat([k, k]))
    assert metrics["rot_loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(contrastive.item() + 0.5 * ce.item(), rel=1e-5)
    loss.backward()
    assert method.rotation_head[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="quarter-turns"):
        plain(x1, x2, k)
    with pytest.raises(ValueError, match="quarter-turns"):
        method(x1, x2)
