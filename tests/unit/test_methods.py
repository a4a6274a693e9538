"""SimCLR / MoCo v2 / MoCo v3 in one process: losses, gradients, momentum and the queue."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_dist.config import MethodConfig, ModelConfig
from ssl_dist.losses import info_nce_loss, nt_xent_loss
from ssl_dist.methods import (
    BYOL,
    MAE,
    METHODS,
    MoCoV2,
    MoCoV3,
    Rotation,
    SimCLR,
    SimMIM,
    SSLMethod,
    alignment,
    build_method,
    uniformity,
)

pytestmark = pytest.mark.unit

BATCH, SIZE, CHANS = 8, 16, 3
MODEL = ModelConfig(widths=(4, 8, 8, 8), proj_hidden=16, proj_dim=8, pred_hidden=16)
NAMES = ["simclr", "moco_v2", "moco_v3"]
METRICS = {"pos_sim", "alignment", "uniformity"}


def _method(name: str, **kw: object) -> SSLMethod:
    torch.manual_seed(0)
    cfg = MethodConfig(name=name, queue_size=kw.pop("queue_size", 4 * BATCH), **kw)  # type: ignore[arg-type]
    return build_method(cfg, MODEL, CHANS, SIZE)


def _views(seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(BATCH, CHANS, SIZE, SIZE, generator=gen),
        torch.randn(BATCH, CHANS, SIZE, SIZE, generator=gen),
    )


def _momentum_params(method: SSLMethod) -> list[torch.nn.Parameter]:
    return [p for target, _ in method.momentum_pairs() for p in target.parameters()]


def test_registry_has_every_method() -> None:
    assert set(METHODS) == {
        "simclr",
        "moco_v2",
        "moco_v3",
        "byol",
        "rotation",
        "mae",
        "simmim",
        "dino",
    }
    assert METHODS["simclr"] is SimCLR and METHODS["moco_v2"] is MoCoV2
    assert METHODS["moco_v3"] is MoCoV3 and METHODS["rotation"] is Rotation
    assert METHODS["byol"] is BYOL and METHODS["mae"] is MAE and METHODS["simmim"] is SimMIM
    for name in [*NAMES, "byol"]:
        method = _method(name)
        assert type(method) is METHODS[name] and method.name == name


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_finite_loss_and_detached_metrics(name: str) -> None:
    method = _method(name)
    loss, metrics = method(*_views())
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    expected = METRICS | {"infonce_bound_nats"} | ({"queue_fill"} if name == "moco_v2" else set())
    assert set(metrics) == expected
    for key, value in metrics.items():
        assert value.ndim == 0 and torch.isfinite(value), key
        assert not value.requires_grad, key
    assert -1 <= metrics["pos_sim"] <= 1 and 0 <= metrics["alignment"] <= 4
    assert -4 * 2.0 <= metrics["uniformity"] <= 0
    # The encoder is the online backbone returning pooled features.
    assert method.encoder(_views()[0]).shape == (BATCH, MODEL.widths[-1])


def test_simclr_loss_and_metrics_match_hand_computation() -> None:
    method = _method("simclr", temperature=0.3)
    assert isinstance(method, SimCLR)
    x1, x2 = _views()
    loss, metrics = method(x1, x2)
    h = method.encoder(torch.cat([x1, x2]))  # one BN batch of both views, as the method does
    z = method.projector(h)
    expected = nt_xent_loss(z[:BATCH], z[BATCH:], 0.3, gather=False)
    torch.testing.assert_close(loss, expected)
    cos = F.cosine_similarity(z[:BATCH], z[BATCH:], dim=1).mean()
    torch.testing.assert_close(metrics["pos_sim"], cos.detach())
    a, b = F.normalize(h[:BATCH], dim=1), F.normalize(h[BATCH:], dim=1)
    torch.testing.assert_close(metrics["alignment"], (2 - 2 * (a * b).sum(1)).mean().detach())
    # Each anchor's softmax runs over the other 2N - 1 views of the batch.
    bound = math.log(2 * BATCH - 1) - expected.detach()
    torch.testing.assert_close(metrics["infonce_bound_nats"], bound)


def test_moco_v3_loss_is_symmetric_and_scaled_by_two_t() -> None:
    method = _method("moco_v3", temperature=0.5)
    assert isinstance(method, MoCoV3)
    x1, x2 = _views()
    loss, metrics = method(x1, x2)
    q1 = method.predictor(method.projector(method.encoder(x1)))
    q2 = method.predictor(method.projector(method.encoder(x2)))
    k1, k2 = method.keys(x1), method.keys(x2)
    both = info_nce_loss(q1, k2, 0.5) + info_nce_loss(q2, k1, 0.5)
    torch.testing.assert_close(loss, 2 * 0.5 * both)
    # N keys per query; the bound uses the mean InfoNCE term, before the 2 T factor.
    bound = math.log(BATCH) - both.detach() / 2
    torch.testing.assert_close(metrics["infonce_bound_nats"], bound)


def test_moco_v2_loss_is_the_mean_of_both_directions_against_the_old_queue() -> None:
    method = _method("moco_v2", temperature=0.4)
    assert isinstance(method, MoCoV2)
    queue = method.queue.clone()
    x1, x2 = _views()
    loss, metrics = method(x1, x2)
    q1, q2 = method.projector(method.encoder(x1)), method.projector(method.encoder(x2))
    k1, k2 = method.keys(x1), method.keys(x2)
    expected = 0.5 * (info_nce_loss(q1, k2, 0.4, queue=queue) + info_nce_loss(q2, k1, 0.4, queue))
    torch.testing.assert_close(loss, expected)
    # Each query's softmax runs over its key and the K queued ones.
    bound = math.log(1 + 4 * BATCH) - expected.detach()
    torch.testing.assert_close(metrics["infonce_bound_nats"], bound)


@pytest.mark.parametrize("name", [*NAMES, "byol"])
def test_backward_reaches_online_params_only(name: str) -> None:
    method = _method(name)
    loss, _ = method(*_views())
    loss.backward()
    trainable = method.trainable_parameters()
    momentum = _momentum_params(method)
    assert trainable and all(p.requires_grad and p.grad is not None for p in trainable)
    assert sum(int(torch.count_nonzero(p.grad)) for p in trainable if p.grad is not None) > 0
    assert bool(momentum) is (name != "simclr")
    for p in momentum:
        assert not p.requires_grad and p.grad is None
    trainable_ids = {id(p) for p in trainable}
    assert not trainable_ids & {id(p) for p in momentum}
    all_ids = {id(p) for p in method.parameters()}
    assert all_ids == trainable_ids | {id(p) for p in momentum}


def _fill(method: SSLMethod, online: float, target: float) -> None:
    with torch.no_grad():
        for tgt, src in method.momentum_pairs():
            for p in src.parameters():
                p.fill_(online)
            for p in tgt.parameters():
                p.fill_(target)


@pytest.mark.parametrize(
    ("name", "step", "total", "expected_m"),
    [
        # cosine schedule m = 1 - (1 - 0.9) * (cos(pi * step / total) + 1) / 2
        ("moco_v3", 0, 10, 0.9),
        ("moco_v3", 5, 10, 0.95),
        ("moco_v3", 10, 10, 1.0),
        ("moco_v2", 5, 10, 0.9),  # fixed momentum
        ("byol", 0, 10, 0.9),  # BYOL: the same cosine schedule
        ("byol", 5, 10, 0.95),
        ("byol", 10, 10, 1.0),
    ],
)
def test_momentum_update_moves_key_encoder_by_the_right_amount(
    name: str, step: int, total: int, expected_m: float
) -> None:
    method = _method(name, momentum=0.9, momentum_final=1.0)
    _fill(method, online=3.0, target=1.0)
    m = method.momentum_update(step, total)
    assert m == pytest.approx(expected_m)
    # t <- m * t + (1 - m) * o = m * 1 + (1 - m) * 3
    pairs = method.momentum_pairs()
    assert len(pairs) == 2  # encoder and projector (the predictors have no momentum copy)
    for target, online in pairs:
        for p in target.parameters():
            torch.testing.assert_close(p, torch.full_like(p, 3.0 - 2.0 * expected_m))
        for p in online.parameters():
            torch.testing.assert_close(p, torch.full_like(p, 3.0))
    # BN running statistics are copied from the online networks.
    for target, source in method.momentum_pairs():
        for tb, sb in zip(target.buffers(), source.buffers(), strict=True):
            torch.testing.assert_close(tb, sb)


def test_simclr_momentum_update_is_a_noop() -> None:
    method = _method("simclr")
    before = {k: v.clone() for k, v in method.state_dict().items()}
    assert method.momentum_update(3, 10) == 0.0
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_moco_v2_realign_queue_after_a_world_size_change() -> None:
    """Keys per step change with the world size: the pointer moves up to the next multiple
    (wrapping at the end of the queue) and stays where it already is one."""
    method = _method("moco_v2", queue_size=12)
    assert isinstance(method, MoCoV2)
    for ptr, keys, want in [(4, 6, 6), (8, 6, 0), (6, 6, 6), (0, 4, 0), (9, 4, 0), (5, 3, 6)]:
        method.queue_ptr.fill_(ptr)
        method.realign_queue(keys)
        assert int(method.queue_ptr) == want, (ptr, keys)


def test_moco_v2_queue_state_pointer_and_contents() -> None:
    method = _method("moco_v2", queue_size=2 * BATCH)
    assert isinstance(method, MoCoV2)
    state = method.state_dict()
    assert state["queue"].shape == (2 * BATCH, MODEL.proj_dim)
    assert state["queue_ptr"].item() == 0 and "queue_filled" in state
    torch.testing.assert_close(state["queue"].norm(dim=1), torch.ones(2 * BATCH))
    initial = method.queue.clone()

    fills, pointers, keys = [], [], []
    for seed in range(3):
        x1, x2 = _views(seed)
        keys.append(F.normalize(method.keys(x2), dim=1))
        _, metrics = method(x1, x2)
        fills.append(metrics["queue_fill"].item())
        pointers.append(int(method.queue_ptr))
    assert pointers == [BATCH, 0, BATCH]
    assert fills == [0.5, 1.0, 1.0]
    # Step 3 overwrote the first half, step 2 wrote the second half.
    torch.testing.assert_close(method.queue[:BATCH], keys[2])
    torch.testing.assert_close(method.queue[BATCH:], keys[1])
    assert not torch.allclose(method.queue[:BATCH], initial[:BATCH])
    # State round trip keeps queue and pointer.
    fresh = _method("moco_v2", queue_size=2 * BATCH)
    fresh.load_state_dict(method.state_dict())
    assert isinstance(fresh, MoCoV2)
    assert torch.equal(fresh.queue, method.queue) and int(fresh.queue_ptr) == BATCH


def test_moco_v2_queue_init_is_deterministic_and_normalised() -> None:
    a, b = _method("moco_v2"), _method("moco_v2")
    torch.manual_seed(123)  # the global RNG must not matter
    c = _method("moco_v2")
    assert isinstance(a, MoCoV2) and isinstance(b, MoCoV2) and isinstance(c, MoCoV2)
    assert torch.equal(a.queue, b.queue) and torch.equal(a.queue, c.queue)


def test_moco_v2_queue_not_multiple_of_batch_raises() -> None:
    method = _method("moco_v2", queue_size=BATCH + 4)
    with pytest.raises(ValueError, match=r"queue_size=12 must be a multiple .* global batch 8"):
        method(*_views())


def test_views_of_different_shapes_raise() -> None:
    x1, x2 = _views()
    for name in NAMES:
        with pytest.raises(ValueError, match="one shape"):
            _method(name)(x1, x2[:-1])


def test_uniformity_and_alignment_hand_values() -> None:
    # Two antipodal points: ||x_i - x_j||^2 = 4, so log(exp(-2 * 4)) = -8.
    x = torch.tensor([[2.0, 0.0], [-3.0, 0.0]])
    assert uniformity(x).item() == pytest.approx(-8.0)
    # Three points at 120 degrees: all squared distances are 3.
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    ring = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert uniformity(ring).item() == pytest.approx(-6.0, abs=1e-5)
    a = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    assert alignment(a, b).item() == pytest.approx((0.0 + 2.0) / 2)
