"""Learning-rate scaling and schedule, parameter groups, LARS adaptation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.optim import Lars
from torch import nn

from ssl_dist.config import OptimConfig
from ssl_dist.optim import LARS_TRUST_COEFF, build_optimizer, lr_at, param_groups, scaled_lr

pytestmark = pytest.mark.unit


def test_scaled_lr_rules() -> None:
    assert scaled_lr(0.3, 1024, 256, "linear") == pytest.approx(1.2)
    assert scaled_lr(0.3, 1024, 256, "sqrt") == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, 256, "none") == pytest.approx(0.3)
    with pytest.raises(ValueError):
        scaled_lr(0.3, 1024, 256, "cubic")  # type: ignore[arg-type]


def test_lr_warmup_then_cosine() -> None:
    peak, total, warm = 2.0, 110, 10
    assert lr_at(0, total, peak, warm, 0.1) == pytest.approx(0.2)
    assert lr_at(4, total, peak, warm, 0.1) == pytest.approx(1.0)
    assert lr_at(9, total, peak, warm, 0.1) == pytest.approx(2.0)
    assert lr_at(10, total, peak, warm, 0.1) == pytest.approx(2.0)
    assert lr_at(60, total, peak, warm, 0.1) == pytest.approx((2.0 + 0.2) / 2)
    quarter = 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr_at(35, total, peak, warm, 0.1) == pytest.approx(quarter)
    assert lr_at(110, total, peak, warm, 0.1) == pytest.approx(0.2)
    assert lr_at(500, total, peak, warm, 0.1) == pytest.approx(0.2)
    assert lr_at(0, 100, 1.0, 0, 0.0) == pytest.approx(1.0)  # no warm-up


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


class _Tokens(nn.Module):
    """Mimics a timm ViT: a 3-d token excluded through ``no_weight_decay``."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.proj = nn.Linear(4, 4)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}


def test_param_groups_exclude_norm_and_bias() -> None:
    net = _Net()
    groups = param_groups(net, 0.05)
    by_name = {g["name"]: g for g in groups}
    decay_ids = {id(p) for p in by_name["decay"]["params"]}
    no_decay_ids = {id(p) for p in by_name["no_decay"]["params"]}
    assert decay_ids == {id(net.conv.weight), id(net.fc.weight)}
    assert no_decay_ids == {id(p) for p in (net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias)}
    assert by_name["decay"]["weight_decay"] == 0.05
    assert by_name["no_decay"]["weight_decay"] == 0.0


def test_param_groups_honour_nested_no_weight_decay() -> None:
    wrapper = nn.Sequential(_Tokens())
    by_name = {g["name"]: g for g in param_groups(wrapper, 0.1)}
    assert any(p is wrapper[0].cls_token for p in by_name["no_decay"]["params"])
    assert not any(p is wrapper[0].cls_token for p in by_name["decay"]["params"])


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_build_optimizer_keeps_group_decay(name: str) -> None:
    cfg = OptimConfig(name=name, weight_decay=0.01, betas=(0.8, 0.9))
    opt = build_optimizer(param_groups(_Net(), cfg.weight_decay), cfg, lr=0.5)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    if name == "adamw":
        assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    if name == "lars":
        assert isinstance(opt, Lars)
        assert [g["always_adapt"] for g in opt.param_groups] == [True, False]


def _one_step(net: nn.Module, cfg: OptimConfig, lr: float) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(net)
    torch.manual_seed(1)
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    build_optimizer(param_groups(net, cfg.weight_decay), cfg, lr).step()
    return {k: v.detach().clone() for k, v in net.named_parameters()}


@pytest.mark.parametrize("wd", [1e-4, 0.0])
def test_lars_does_not_adapt_bn_or_bias(wd: float) -> None:
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)  # non-zero norm, else timm's ratio falls back to 1
    lr = 0.1
    lars = _one_step(net, OptimConfig(name="lars", weight_decay=wd, momentum=0.9), lr)
    sgd = _one_step(net, OptimConfig(name="sgd", weight_decay=wd, momentum=0.9), lr)
    for name in ("conv.bias", "bn.weight", "bn.bias", "fc.bias"):
        torch.testing.assert_close(lars[name], sgd[name], msg=name)
    torch.manual_seed(1)
    grads = {k: torch.randn_like(p) for k, p in net.named_parameters() if p.requires_grad}
    for name in ("conv.weight", "fc.weight"):
        w, g = dict(net.named_parameters())[name].detach(), grads[name]
        # LARS (You et al. 2017): lr * eta * |w| / (|g| + wd |w|) * (g + wd w); first momentum
        # step equals the gradient. Adapted even with wd = 0.
        ratio = LARS_TRUST_COEFF * w.norm() / (g.norm() + wd * w.norm())
        torch.testing.assert_close(lars[name], w - lr * ratio * (g + wd * w), msg=name)
        assert not torch.allclose(lars[name], sgd[name])
