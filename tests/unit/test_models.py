"""Encoders, heads and momentum encoders."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_dist.config import ModelConfig
from ssl_dist.models import (
    THIN_LAYERS,
    Predictor,
    Projector,
    ThinResNet,
    build_encoder,
    build_predictor,
    build_projector,
    cosine_momentum,
    ema_update,
    make_momentum_copy,
    maybe_sync_bn,
)

pytestmark = pytest.mark.unit


def _expected_thin_params(in_ch: int, widths: tuple[int, ...], layers: tuple[int, ...]) -> int:
    """Parameter count of a BasicBlock ResNet with a 3x3 stem, from the architecture.

    3x3 conv without bias: 9 * c_in * c_out; BN: 2 * c; 1x1 projection shortcut + BN on the first
    block of a stage whose stride or width changes (every stage but the first here).
    """
    w0 = widths[0]
    total = 9 * in_ch * w0 + 2 * w0
    c_prev = w0
    for stage, (c, n) in enumerate(zip(widths, layers, strict=True)):
        for b in range(n):
            c_in = c_prev if b == 0 else c
            total += 9 * c_in * c + 2 * c + 9 * c * c + 2 * c
            if b == 0 and (stage > 0 or c_in != c):
                total += c_in * c + 2 * c
        c_prev = c
    return total


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("widths", [(16, 32, 64, 128), (8, 12, 24, 40)])
@pytest.mark.parametrize("in_ch", [1, 3])
def test_thin_resnet_widths_and_param_count(widths: tuple[int, ...], in_ch: int) -> None:
    enc = build_encoder(ModelConfig(encoder="thin_resnet", widths=widths), in_ch, 32)
    assert isinstance(enc, ThinResNet)
    assert enc.conv1.in_channels == in_ch
    # The trap: timm's default stem is 64 channels whatever stem_width says.
    assert enc.conv1.out_channels == widths[0]
    assert enc.bn1.num_features == widths[0]
    for i, (width, n) in enumerate(zip(widths, THIN_LAYERS, strict=True)):
        stage = enc.get_submodule(f"layer{i + 1}")
        assert isinstance(stage, nn.Sequential) and len(stage) == n
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.out_channels == width for c in convs)
    assert enc.num_features == widths[-1]
    assert _n_params(enc) == _expected_thin_params(in_ch, widths, THIN_LAYERS)


def test_thin_resnet_output_shape() -> None:
    enc = build_encoder(ModelConfig(), 3, 32)
    assert enc(torch.randn(4, 3, 32, 32)).shape == (4, 128)


@pytest.mark.parametrize(
    ("name", "features"),
    [("resnet18", 512), ("resnet50", 2048), ("vit_tiny", 192), ("vit_small", 384)],
)
def test_timm_encoders_forward_at_32px(name: str, features: int) -> None:
    enc = build_encoder(ModelConfig(encoder=name), 3, 32)
    assert enc.num_features == features
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, features)


def test_vit_small_stem_uses_small_patches() -> None:
    enc = build_encoder(ModelConfig(encoder="vit_tiny", small_stem=True), 1, 32)
    # 32 / 4 = 8: an 8 x 8 token grid plus the class token.
    assert enc.get_parameter("pos_embed").shape == (1, 1 + 8 * 8, 192)
    with pytest.raises(ValueError, match="patch"):
        build_encoder(ModelConfig(encoder="vit_tiny", small_stem=False), 3, 28)


def _layer1_hw(enc: nn.Module, size: int) -> tuple[int, int]:
    seen: list[torch.Size] = []
    hook = enc.get_submodule("layer1").register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        enc(torch.randn(2, 3, size, size))
    hook.remove()
    return seen[0][-2], seen[0][-1]


@pytest.mark.parametrize("name", ["thin_resnet", "resnet18"])
def test_small_stem_keeps_resolution_in_first_stage(name: str) -> None:
    small = build_encoder(ModelConfig(encoder=name, small_stem=True), 3, 32)
    big = build_encoder(ModelConfig(encoder=name, small_stem=False), 3, 32)
    assert _layer1_hw(small, 32) == (32, 32)
    assert _layer1_hw(big, 32) == (8, 8)  # stride-2 conv + stride-2 max-pool


def _gamma_sum(m: nn.Module, path: str) -> float:
    return float(m.get_parameter(path).detach().abs().sum())


def test_zero_init_residual_makes_blocks_identity() -> None:
    torch.manual_seed(0)
    zero = build_encoder(ModelConfig(), 3, 32, zero_init_residual=True).eval()
    torch.manual_seed(0)
    plain = build_encoder(ModelConfig(), 3, 32, zero_init_residual=False).eval()
    blocks = [f"layer{s}.{b}.bn2.weight" for s in range(1, 5) for b in range(THIN_LAYERS[s - 1])]
    assert all(_gamma_sum(zero, path) == 0 for path in blocks)
    assert all(_gamma_sum(plain, path) > 0 for path in blocks)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        # layer1.0 has no shortcut projection: with a zero gamma it is relu(x).
        torch.testing.assert_close(zero.get_submodule("layer1.0")(x.clone()), torch.relu(x))
        assert not torch.allclose(plain.get_submodule("layer1.0")(x.clone()), torch.relu(x))
        img = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(zero(img), plain(img))


@pytest.mark.parametrize(("name", "last_bn"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_timm_resnet_zero_init_flag(name: str, last_bn: str) -> None:
    on = build_encoder(ModelConfig(encoder=name), 3, 32, zero_init_residual=True)
    off = build_encoder(ModelConfig(encoder=name), 3, 32, zero_init_residual=False)
    assert _gamma_sum(on, f"layer1.0.{last_bn}.weight") == 0
    assert _gamma_sum(off, f"layer1.0.{last_bn}.weight") > 0


def test_sync_bn_off_is_noop_and_on_cpu_is_refused() -> None:
    enc = build_encoder(ModelConfig(), 3, 32)
    assert maybe_sync_bn(enc, False) is enc
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the CPU refusal cannot be exercised")
    with pytest.raises(ValueError, match="CUDA"):
        maybe_sync_bn(enc, True)


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("last_bn", [False, True])
def test_projector_shapes_and_layout(layers: int, last_bn: bool) -> None:
    cfg = ModelConfig(proj_hidden=64, proj_dim=16, proj_layers=layers)
    proj = build_projector(cfg, in_dim=32, last_bn=last_bn)
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == layers
    assert [(lin.in_features, lin.out_features) for lin in linears][-1] == (64, 16)
    out = proj(torch.randn(8, 32))
    assert out.shape == (8, 16)
    last = list(proj.net)[-1]
    if last_bn:
        assert isinstance(last, nn.BatchNorm1d) and not last.affine
        torch.testing.assert_close(out.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    else:
        assert isinstance(last, nn.Linear) and last.bias is not None


def test_predictor_shapes() -> None:
    pred = build_predictor(ModelConfig(proj_dim=16, pred_hidden=48))
    assert isinstance(pred, Predictor) and isinstance(pred, Projector)
    linears = [m for m in pred.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(16, 48), (48, 16)]
    assert pred(torch.randn(4, 16)).shape == (4, 16)


def test_predictor_last_bn_for_vits() -> None:
    # MoCo v3's ViT predictor ends in an affine-free BN; its ResNet predictor does not.
    last = list(build_predictor(ModelConfig(proj_dim=16, pred_last_bn=True)).modules())[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine
    plain = list(build_predictor(ModelConfig(proj_dim=16)).modules())[-1]
    assert isinstance(plain, nn.Linear)


def test_vit_heads() -> None:
    # timm's vit_small has 6 heads; MoCo v3's ViT-S has 12 (same width, 32 channels per head).
    for heads in (None, 12):
        cfg = ModelConfig(encoder="vit_small", small_stem=False, vit_heads=heads)
        with torch.device("meta"):
            vit = build_encoder(cfg, 3, 32)
        assert vit.blocks[0].attn.num_heads == (heads or 6)


def test_vit_depth() -> None:
    for depth in (None, 3):
        cfg = ModelConfig(encoder="vit_tiny", small_stem=False, vit_depth=depth)
        with torch.device("meta"):
            vit = build_encoder(cfg, 3, 32)
        assert len(vit.blocks) == (depth or 12)


def _bn_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_update_matches_hand_computation() -> None:
    torch.manual_seed(0)
    online, target = _bn_net(), _bn_net()
    with torch.no_grad():
        for p in online.parameters():  # BN starts at gamma=1, beta=0 in both: make them differ
            p.add_(torch.randn_like(p))
    online(torch.randn(8, 3))  # moves online's running stats away from target's
    t0 = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update(target, online, momentum=0.9)
    o = online.state_dict()
    t = target.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(t[name], 0.9 * t0[name] + 0.1 * o[name])
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(t[name], o[name])


def test_ema_momentum_endpoints() -> None:
    online, target = _bn_net(), _bn_net()
    w_t, w_o = target.get_parameter("0.weight"), online.get_parameter("0.weight")
    before = w_t.detach().clone()
    ema_update(target, online, 1.0)
    assert torch.equal(w_t, before)
    ema_update(target, online, 0.0)
    assert torch.equal(w_t, w_o)


def test_make_momentum_copy_is_frozen_and_independent() -> None:
    online = _bn_net()
    target = make_momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    w_t, w_o = target.get_parameter("0.weight"), online.get_parameter("0.weight")
    assert torch.equal(w_t, w_o)
    with torch.no_grad():
        w_o.add_(1.0)
    assert not torch.equal(w_t, w_o)


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_momentum(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_momentum(500, 100, 0.99, 1.0) == pytest.approx(1.0)  # clamped
    # MoCo v3's formula at an arbitrary step.
    moco = 1 - (1 - 0.996) * (math.cos(math.pi * 30 / 90) + 1) / 2
    assert cosine_momentum(30, 90, 0.996) == pytest.approx(moco)
    assert cosine_momentum(100, 100, 0.9, 0.95) == pytest.approx(0.95)
