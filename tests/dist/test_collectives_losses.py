"""Real gloo worlds: gathered losses and gradients equal single-process ones on the global batch.

World-W semantics checked here: the loss is the mean of the per-rank losses (what the trainer
logs after ``all_reduce_mean``) and the gradient is the mean over ranks of each rank's gradient
(what DDP / DeepSpeed gradient averaging produces). Inputs are modelled as a replicated global
leaf tensor that each rank slices, so "the gradient" of the inputs is averaged like a parameter.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ssl_dist.dist import collectives
from ssl_dist.dist.spawn import run_world
from ssl_dist.losses import info_nce_loss, nt_xent_loss

pytestmark = pytest.mark.dist

PER_RANK = 3
DIM_IN, DIM, QUEUE = 5, 4, 7
TEMPERATURE = 0.2
RTOL, ATOL = 1e-10, 1e-12


def _global_batch(global_size: int) -> dict[str, Tensor]:
    """Fixed float64 data, rebuilt identically by every rank and by the parent."""
    generator = torch.Generator().manual_seed(1234 + global_size)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return {
        "x1": randn(global_size, DIM_IN),
        "x2": randn(global_size, DIM_IN),
        "weight": randn(DIM_IN, DIM),
        "momentum_weight": randn(DIM_IN, DIM),
        "queue": randn(QUEUE, DIM),
        "scale": randn(global_size, DIM_IN),
    }


def _grad(t: Tensor) -> Tensor:
    assert t.grad is not None
    return t.grad


def _loss_and_grads(
    name: str, data: dict[str, Tensor], rank: int, world_size: int, per_rank: int
) -> dict[str, Tensor]:
    """One training-step's loss and gradients on this rank, then averaged like DDP."""
    x1 = data["x1"].clone().requires_grad_()
    x2 = data["x2"].clone().requires_grad_()
    weight = data["weight"].clone().requires_grad_()
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    if name == "nt_xent":
        loss = nt_xent_loss(x1[rows] @ weight, x2[rows] @ weight, TEMPERATURE)
    else:
        with torch.no_grad():
            k = x2[rows] @ data["momentum_weight"]
        queue = data["queue"] if name == "info_nce_queue" else None
        loss = info_nce_loss(x1[rows] @ weight, k, TEMPERATURE, queue=queue)
    loss.backward()
    zeros = torch.zeros_like(data["x1"])
    local_grad_x1 = x1.grad if x1.grad is not None else zeros
    local_grad_x2 = x2.grad if x2.grad is not None else zeros
    return {
        "local_loss": loss.detach(),
        "local_grad_x1": local_grad_x1.clone(),
        "loss": collectives.all_reduce_mean(loss),
        "grad_x1": collectives.all_reduce_mean(local_grad_x1),
        "grad_x2": collectives.all_reduce_mean(local_grad_x2),
        "grad_weight": collectives.all_reduce_mean(_grad(weight)),
    }


LOSSES = ["nt_xent", "info_nce_v3", "info_nce_queue"]


def _losses_worker(rank: int, world_size: int, per_rank: int) -> dict[str, object]:
    data = _global_batch(world_size * per_rank)
    out: dict[str, object] = {
        name: _loss_and_grads(name, data, rank, world_size, per_rank) for name in LOSSES
    }
    out["world"] = torch.tensor([collectives.rank(), collectives.world_size()])
    out["is_rank_zero"] = collectives.is_rank_zero()
    out["broadcast"] = collectives.broadcast_object(f"from rank {rank}")

    # all_gather_with_grad through L_r = (r+1) * sum(scale * g**2), g the gathered x. Its
    # gradient for rank s's rows is sum_r (r+1) * 2 * scale_s * x_s = W(W+1) * scale_s * x_s.
    x_all = data["x1"]
    x = x_all[rank * per_rank : (rank + 1) * per_rank].clone().requires_grad_()
    gathered = collectives.all_gather_with_grad(x)
    ((rank + 1) * (data["scale"] * gathered**2).sum()).backward()
    out["gathered"] = gathered.detach()
    out["gather_grad"] = x.grad
    out["gathered_no_grad"] = collectives.all_gather_no_grad(x)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    world_size = request.param
    return world_size, run_world(_losses_worker, world_size, PER_RANK, timeout=120)


@pytest.mark.parametrize("name", LOSSES)
def test_world_loss_and_gradients_equal_single_process(world, name: str) -> None:
    world_size, results = world
    global_size = world_size * PER_RANK
    # No process group in the test process: the same code is the single-process reference.
    assert collectives.world_size() == 1
    expected = _loss_and_grads(name, _global_batch(global_size), 0, 1, global_size)
    for rank, result in enumerate(results):
        got = result[name]
        for key in ("loss", "grad_x1", "grad_x2", "grad_weight"):
            torch.testing.assert_close(
                got[key], expected[key], rtol=RTOL, atol=ATOL, msg=f"rank {rank} {key}"
            )
        # Per rank: gradient only on its own rows, W times the global one there (DDP's mean
        # over ranks divides by W again).
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        local = got["local_grad_x1"]
        torch.testing.assert_close(
            local[rows], world_size * expected["grad_x1"][rows], rtol=RTOL, atol=ATOL
        )
        assert torch.count_nonzero(torch.cat([local[: rows.start], local[rows.stop :]])) == 0
    local_losses = torch.stack([result[name]["local_loss"] for result in results])
    torch.testing.assert_close(local_losses.mean(), expected["loss"], rtol=RTOL, atol=ATOL)
    assert name == "info_nce_queue" or local_losses.std() > 0  # ranks really differ


def test_gather_forward_and_gradient_sum(world) -> None:
    world_size, results = world
    data = _global_batch(world_size * PER_RANK)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["gathered"], data["x1"], rtol=0, atol=0)
        torch.testing.assert_close(result["gathered_no_grad"], data["x1"], rtol=0, atol=0)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        expected = world_size * (world_size + 1) * data["scale"][rows] * data["x1"][rows]
        torch.testing.assert_close(result["gather_grad"], expected, rtol=RTOL, atol=ATOL)


def test_rank_queries(world) -> None:
    world_size, results = world
    for rank, result in enumerate(results):
        assert result["world"].tolist() == [rank, world_size]
        assert result["is_rank_zero"] is (rank == 0)
        assert result["broadcast"] == "from rank 0"


def _unequal_worker(rank: int, world_size: int) -> dict[str, str]:
    rows = PER_RANK + (1 if rank == 1 else 0)
    z = torch.ones(rows, DIM, dtype=torch.float64, requires_grad=True)
    messages = {}
    # Each check raises on every rank after the same shape collective, so ranks stay in step.
    checks = {
        "nt_xent": lambda: nt_xent_loss(z, z, TEMPERATURE),
        "info_nce": lambda: info_nce_loss(z, z, TEMPERATURE),
        "with_grad": lambda: collectives.all_gather_with_grad(z),
        "no_grad": lambda: collectives.all_gather_no_grad(z),
        "dim1": lambda: collectives.all_gather_no_grad(torch.ones(PER_RANK, DIM + rank)),
    }
    for name, check in checks.items():
        try:
            check()
        except ValueError as error:
            messages[name] = str(error)
        else:
            messages[name] = "no error"
    return messages


def test_unequal_shapes_raise_value_error_on_every_rank() -> None:
    world_size = 3
    results = run_world(_unequal_worker, world_size, timeout=60)
    sizes = [PER_RANK, PER_RANK + 1, PER_RANK]
    for messages in results:
        for name in ("nt_xent", "info_nce", "with_grad", "no_grad"):
            assert f"dim-0 sizes {sizes}" in messages[name], messages[name]
        assert f"({PER_RANK}, {DIM + 1})" in messages["dim1"], messages["dim1"]
