"""BYOL in one process: its loss by hand, shapes and metrics, no gradient into the target, and
the loss in float32 under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ssl_dist.config import MethodConfig
from ssl_dist.methods import BYOL, build_method
from ssl_dist.methods.byol import regression_loss
from tests.unit.test_methods import BATCH, CHANS, MODEL, SIZE, _views

pytestmark = pytest.mark.unit


def _byol(**kw: object) -> BYOL:
    torch.manual_seed(0)
    method = build_method(MethodConfig(name="byol", **kw), MODEL, CHANS, SIZE)  # type: ignore[arg-type]
    assert isinstance(method, BYOL)
    return method


def test_regression_loss_hand_computed() -> None:
    # Row 0: p and z point the same way: 2 - 2 * 1 = 0 (whatever their norms).
    # Row 1: p = (1, 1), z = (0, 2): cos = 1 / sqrt(2), so 2 - sqrt(2).
    # Row 2: opposite directions: 2 - 2 * (-1) = 4, the maximum.
    p = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    z = torch.tensor([[0.5, 0.0], [0.0, 2.0], [0.0, -7.0]], dtype=torch.float64)
    got = regression_loss(p, z)
    want = torch.tensor([0.0, 2 - math.sqrt(2), 4.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The squared distance of the normalised vectors (eq. 2) is the same number.
    pn, zn = p / p.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, (pn - zn).pow(2).sum(dim=1), rtol=1e-12, atol=1e-12)


def test_regression_loss_stops_the_gradient_at_the_target() -> None:
    p = torch.tensor([[1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[0.0, 2.0]], requires_grad=True)
    regression_loss(p, z).sum().backward()
    assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    assert z.grad is None


def test_regression_loss_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="p and z"):
        regression_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_forward_shapes_metrics_and_loss_by_hand() -> None:
    method = _byol()
    x1, x2 = _views()
    loss, metrics = method(x1, x2)
    assert loss.ndim == 0 and loss.requires_grad and 0 <= float(loss.detach()) <= 8
    assert set(metrics) == {"pos_sim", "alignment", "uniformity"}
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    # The same loss written out: online predictions of each view against the target
    # projections of the other, 2 - 2 cos per image, both directions summed, batch mean.
    p1 = method.predictor(method.projector(method.encoder(x1)))
    p2 = method.predictor(method.projector(method.encoder(x2)))
    with torch.no_grad():
        z1 = method.momentum_projector(method.momentum_encoder(x1))
        z2 = method.momentum_projector(method.momentum_encoder(x2))
    assert p1.shape == z2.shape == (BATCH, MODEL.proj_dim)

    def cos(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    want = ((2 - 2 * cos(p1, z2)) + (2 - 2 * cos(p2, z1))).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(metrics["pos_sim"], torch.cat([cos(p1, z2), cos(p2, z1)]).mean())


def test_target_gets_no_gradient_and_online_heads_do() -> None:
    method = _byol()
    loss, _ = method(*_views())
    loss.backward()
    for module in (method.momentum_encoder, method.momentum_projector):
        for p in module.parameters():
            assert not p.requires_grad and p.grad is None
    for module in (method.encoder, method.projector, method.predictor):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        assert sum(int(torch.count_nonzero(g)) for g in grads if g is not None) > 0
    trainable = {id(p) for p in method.trainable_parameters()}
    assert {id(p) for p in method.predictor.parameters()} <= trainable
    assert not trainable & {id(p) for p in method.momentum_encoder.parameters()}


def test_target_starts_as_the_online_network_and_the_schedule_spans_the_config() -> None:
    method = _byol(momentum=0.996, momentum_final=1.0)
    for target, online in method.momentum_pairs():
        for t, o in zip(target.state_dict().values(), online.state_dict().values(), strict=True):
            assert torch.equal(t, o)
    assert method.momentum_at(0, 100) == pytest.approx(0.996)
    assert method.momentum_at(50, 100) == pytest.approx(0.998)
    assert method.momentum_at(100, 100) == pytest.approx(1.0)


def test_loss_is_float32_under_bf16_autocast() -> None:
    method = _byol()
    x1, x2 = _views()
    want, _ = method(x1, x2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = method(x1, x2)
    assert loss.dtype == torch.float32
    # bf16 convolutions move the features a little; the loss stays close to the fp32 one.
    assert abs(float(loss.detach()) - float(want.detach())) < 0.1
