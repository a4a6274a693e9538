"""NT-Xent and InfoNCE against plain-loop references, a hand-computed case, dtypes, fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ssl_dist.dist import collectives
from ssl_dist.losses import info_nce_loss, infonce_bound, nt_xent_loss

pytestmark = pytest.mark.unit


def _unit_rows(x: Tensor) -> list[Tensor]:
    return [row / torch.sqrt(torch.dot(row, row)) for row in x]


def _naive_nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR Eq. (1), one anchor at a time: views 0..N-1 are z1, N..2N-1 are z2."""
    views = _unit_rows(z1) + _unit_rows(z2)
    n, m = len(z1), 2 * len(z1)
    total = torch.zeros((), dtype=z1.dtype)
    for a in range(m):
        positive = (a + n) % m
        denominator = torch.zeros((), dtype=z1.dtype)
        for c in range(m):
            if c != a:
                denominator = denominator + torch.exp(torch.dot(views[a], views[c]) / temperature)
        numerator = torch.exp(torch.dot(views[a], views[positive]) / temperature)
        total = total - torch.log(numerator / denominator)
    return total / m


def _naive_info_nce(q: Tensor, k: Tensor, temperature: float, queue: Tensor | None) -> Tensor:
    """MoCo InfoNCE per query: positive k_i; negatives the other keys or the queue."""
    queries, keys = _unit_rows(q), _unit_rows(k.detach())
    total = torch.zeros((), dtype=q.dtype)
    for i, query in enumerate(queries):
        numerator = torch.exp(torch.dot(query, keys[i]) / temperature)
        if queue is None:
            denominator = sum(torch.exp(torch.dot(query, key) / temperature) for key in keys)
        else:
            denominator = numerator + sum(
                torch.exp(torch.dot(query, neg) / temperature) for neg in _unit_rows(queue)
            )
        total = total - torch.log(numerator / denominator)
    return total / len(queries)


def _randn(*shape: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("gather", [True, False])
def test_nt_xent_matches_naive_loss_and_gradients(n: int, gather: bool) -> None:
    z1 = _randn(n, 3, seed=1).requires_grad_()
    z2 = _randn(n, 3, seed=2).requires_grad_()
    loss = nt_xent_loss(z1, z2, temperature=0.3, gather=gather)
    loss.backward()
    assert z1.grad is not None and z2.grad is not None
    got_grads = (z1.grad.clone(), z2.grad.clone())

    z1.grad, z2.grad = None, None
    expected = _naive_nt_xent(z1, z2, 0.3)
    expected.backward()

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grads[0], z1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grads[1], z2.grad, rtol=1e-10, atol=1e-12)


def test_nt_xent_hand_computed() -> None:
    # Unit vectors: a=(0.6,0.8), b=(1,0) are view 1; c=(0,1), d=(s,s) are view 2, s=1/sqrt(2).
    # Pairs (a, c) and (b, d) are positives.
    z1 = torch.tensor([[3.0, 4.0], [2.0, 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.0, 5.0], [1.0, 1.0]], dtype=torch.float64)
    t = 0.5
    s = 1 / math.sqrt(2)
    ab, ac, ad, bc, bd, cd = 0.6, 0.8, 1.4 * s, 0.0, s, s

    def anchor_loss(positive: float, negative1: float, negative2: float) -> float:
        denominator = math.exp(positive / t) + math.exp(negative1 / t) + math.exp(negative2 / t)
        return -math.log(math.exp(positive / t) / denominator)

    expected = (
        anchor_loss(ac, ab, ad)  # anchor a
        + anchor_loss(bd, ab, bc)  # anchor b
        + anchor_loss(ac, bc, cd)  # anchor c
        + anchor_loss(bd, ad, cd)  # anchor d
    ) / 4
    assert nt_xent_loss(z1, z2, temperature=t).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("gather", [True, False])
def test_info_nce_without_queue_matches_naive(n: int, gather: bool) -> None:
    q = _randn(n, 3, seed=3).requires_grad_()
    k = _randn(n, 3, seed=4).requires_grad_()
    loss = info_nce_loss(q, k, temperature=0.2, gather=gather)
    loss.backward()
    assert q.grad is not None
    got_grad = q.grad.clone()
    assert k.grad is None  # keys are targets

    q.grad = None
    expected = _naive_info_nce(q, k, 0.2, queue=None)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, q.grad, rtol=1e-10, atol=1e-12)


def test_info_nce_with_queue_matches_naive() -> None:
    q = _randn(4, 3, seed=5).requires_grad_()
    k = _randn(4, 3, seed=6)
    queue = _randn(7, 3, seed=7).requires_grad_()
    loss = info_nce_loss(q, k, temperature=0.2, queue=queue)
    loss.backward()
    assert q.grad is not None
    got_grad = q.grad.clone()
    assert queue.grad is None

    q.grad = None
    expected = _naive_info_nce(q, k, 0.2, queue=queue.detach())
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, q.grad, rtol=1e-10, atol=1e-12)


def test_info_nce_hand_computed() -> None:
    # q0=(1,0), q1=(0,1); k0=(s,s), k1=(0,1).
    q = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    k = torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    t = 0.25
    s = 1 / math.sqrt(2)
    loss0 = -math.log(math.exp(s / t) / (math.exp(s / t) + math.exp(0.0)))
    loss1 = -math.log(math.exp(1 / t) / (math.exp(s / t) + math.exp(1 / t)))
    assert info_nce_loss(q, k, temperature=t).item() == pytest.approx(
        (loss0 + loss1) / 2, rel=1e-12
    )
    # With a queue holding only u=(1,0): positives on the diagonal, one negative each.
    queue = torch.tensor([[4.0, 0.0]], dtype=torch.float64)
    loss0 = -math.log(math.exp(s / t) / (math.exp(s / t) + math.exp(1 / t)))
    loss1 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0.0)))
    got = info_nce_loss(q, k, temperature=t, queue=queue).item()
    assert got == pytest.approx((loss0 + loss1) / 2, rel=1e-12)


def test_bf16_inputs_give_finite_fp32_accurate_loss() -> None:
    # Large norms and a small temperature: logits up to 1/0.05 = 20.
    z1 = (_randn(16, 32, seed=8) * 300).float()
    z2 = (z1 + 30 * _randn(16, 32, seed=9).float()).float()
    queue = _randn(64, 32, seed=10).float()
    cases = [
        lambda a, b: nt_xent_loss(a, b, temperature=0.05),
        lambda a, b: info_nce_loss(a, b, temperature=0.05),
        lambda a, b: info_nce_loss(a, b, temperature=0.05, queue=queue.bfloat16()),
    ]
    for loss_fn in cases:
        reference = loss_fn(z1, z2)
        a = z1.bfloat16().requires_grad_()
        loss = loss_fn(a, z2.bfloat16())
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)
        # Only the bf16 rounding of the inputs differs (about 3 digits), not the logit math.
        torch.testing.assert_close(loss, reference, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(loss, loss_fn(a.detach().float(), z2.bfloat16().float()))
        loss.backward()
        assert a.grad is not None and a.grad.dtype == torch.bfloat16
        assert torch.isfinite(a.grad.float()).all()


def test_high_temperature_tends_to_uniform_softmax() -> None:
    n, k_size = 6, 9
    z1, z2 = _randn(n, 4, seed=11), _randn(n, 4, seed=12)
    queue = _randn(k_size, 4, seed=13)
    t = 1e6
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)
    assert info_nce_loss(z1, z2, t).item() == pytest.approx(math.log(n), rel=1e-5)
    assert info_nce_loss(z1, z2, t, queue=queue).item() == pytest.approx(
        math.log(k_size + 1), rel=1e-5
    )


def test_lower_temperature_sharpens_aligned_views() -> None:
    # Identical views of orthogonal samples: the positive has the largest similarity, so a
    # colder softmax puts more mass on it and the loss falls.
    z = torch.eye(4, dtype=torch.float64)
    losses = [nt_xent_loss(z, z, t).item() for t in (1.0, 0.5, 0.1)]
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] == pytest.approx(math.log(1 + 6 * math.exp(-10)), rel=1e-9)
    losses = [info_nce_loss(z, z, t).item() for t in (1.0, 0.5, 0.1)]
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan")])
def test_bad_temperature_raises(temperature: float) -> None:
    z = _randn(2, 3, seed=14)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z, z, temperature)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(z, z, temperature)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="z1 and z2"):
        nt_xent_loss(_randn(2, 3, seed=0), _randn(3, 3, seed=0), 0.1)
    with pytest.raises(ValueError, match="q and k"):
        info_nce_loss(_randn(2, 3, seed=0), _randn(2, 4, seed=0), 0.1)
    with pytest.raises(ValueError, match="queue"):
        info_nce_loss(_randn(2, 3, seed=0), _randn(2, 3, seed=0), 0.1, queue=_randn(5, 4, seed=0))


def test_collectives_fall_back_without_process_group() -> None:
    assert collectives.rank() == 0
    assert collectives.world_size() == 1
    assert collectives.is_rank_zero()

    x = _randn(3, 2, seed=15).requires_grad_()
    gathered = collectives.all_gather_with_grad(x)
    assert gathered is x
    (gathered * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))

    detached = collectives.all_gather_no_grad(x)
    assert not detached.requires_grad
    torch.testing.assert_close(detached, x.detach())

    mean = collectives.all_reduce_mean(x)
    assert not mean.requires_grad
    torch.testing.assert_close(mean, x.detach())
    assert mean.data_ptr() != x.data_ptr()
    assert collectives.broadcast_object({"run": 7}) == {"run": 7}


def test_infonce_bound_is_zero_at_chance() -> None:
    # Identical keys: every query's logits are equal, L = log N exactly, and the bound is 0.
    q = _randn(4, 3, seed=20)
    k = torch.ones(4, 3, dtype=torch.float64)
    loss = info_nce_loss(q, k, temperature=0.2, gather=False)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-12)
    assert infonce_bound(loss, 4).item() == pytest.approx(0.0, abs=1e-6)
    # NT-Xent with every view identical: 2N - 1 equal candidates per anchor (itself excluded).
    z = torch.ones(3, 5, dtype=torch.float64)
    loss = nt_xent_loss(z, z, temperature=0.5, gather=False)
    assert loss.item() == pytest.approx(math.log(2 * 3 - 1), rel=1e-12)
    assert infonce_bound(loss, 2 * 3 - 1).item() == pytest.approx(0.0, abs=1e-6)


def test_infonce_bound_hand_computed_two_by_two() -> None:
    # q = k = I (2 x 2), T = 1: logits [[1, 0], [0, 1]], each query's positive scores 1 against
    # one negative at 0, so L = log(1 + e^-1) and the bound is log 2 - L = log(2e / (e + 1)).
    eye = torch.eye(2, dtype=torch.float64)
    loss = info_nce_loss(eye, eye, temperature=1.0, gather=False)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)
    bound = infonce_bound(loss, 2)
    assert bound.item() == pytest.approx(math.log(2 * math.e / (math.e + 1)), rel=1e-6)
    assert bound.item() == pytest.approx(0.37988549, rel=1e-6)
    assert bound.dtype == torch.float32 and not bound.requires_grad
    # The bound never exceeds log N: a perfect positive at a tiny temperature reaches it.
    sharp = info_nce_loss(eye, eye, temperature=0.01, gather=False)
    assert infonce_bound(sharp, 2).item() == pytest.approx(math.log(2), abs=1e-6)


def test_infonce_bound_detaches_and_refuses_no_candidates() -> None:
    loss = torch.tensor(0.5, requires_grad=True)
    assert not infonce_bound(loss, 3).requires_grad
    with pytest.raises(ValueError, match="candidates"):
        infonce_bound(loss, 0)
