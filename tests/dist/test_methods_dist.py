"""Real gloo worlds: a method trained on W ranks x B images equals one process on W*B images.

What is compared. Each rank runs a few training steps on its slice of a fixed global batch:
forward, backward, gradients averaged over ranks (what DDP / DeepSpeed do), an SGD step and the
momentum update. The mean of the per-rank losses, the averaged gradients, the final parameters
and (MoCo v2) the queue and its pointer must equal those of one process on the whole batch.

BatchNorm and honesty. In training mode BN normalises with statistics of the batch it sees, so a
rank that sees B images computes different features than one process seeing W*B: the two runs
are DIFFERENT models of computation, and no gather can make them equal (only SyncBatchNorm
would, which does not run on CPU). To test the gather / loss / gradient path on its own, every
BatchNorm layer is switched to eval mode (running statistics) while the method itself stays in
training mode: each sample's features then no longer depend on the other samples of its batch,
and the remaining cross-sample coupling is exactly what the methods implement with collectives
(gathered negatives and keys, the shared queue, shuffle-BN's permutation; BYOL has none, so
for it the check covers its per-image loss mean, the averaged gradient and the momentum
target). BN parameters and running statistics are randomised so that BN is not the identity and
zero-initialised residual gammas do not hide gradients. Shuffle-BN with BN in training mode is
checked separately against a hand-built reference that uses the same permutation.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.config import MethodConfig, ModelConfig
from ssl_dist.dist import collectives
from ssl_dist.dist.spawn import run_world
from ssl_dist.methods import MoCoV2, SSLMethod, build_method

pytestmark = pytest.mark.dist

PER_RANK, STEPS, QUEUE = 4, 3, 24  # QUEUE is a multiple of the global batch for W = 1, 2, 3
SIZE, CHANS = 16, 3
RTOL, ATOL = 1e-9, 1e-11
SHUFFLE_SEED = 4321
MODEL = ModelConfig(widths=(4, 8, 8, 8), proj_hidden=16, proj_dim=8, pred_hidden=16)
SPECS: dict[str, dict[str, Any]] = {
    "simclr": {"name": "simclr"},
    "simclr_rotation": {"name": "simclr", "rotation_weight": 0.5},
    "moco_v3": {"name": "moco_v3"},
    "byol": {"name": "byol"},
    "moco_v2": {"name": "moco_v2", "shuffle_bn": False},
    "moco_v2_shuffle_bn": {"name": "moco_v2", "shuffle_bn": True},
    "rotation": {"name": "rotation"},
    "mae": {"name": "mae", "masked": {"decoder_dim": 16, "decoder_heads": 2}},
    "simmim": {"name": "simmim"},
    "dino": {
        "name": "dino",
        "dino": {
            "out_dim": 16,
            "hidden_dim": 16,
            "bottleneck_dim": 8,
            "norm_last_layer": False,
            "warmup_teacher_temp": 0.02,
            "teacher_temp_warmup_steps": 2,
        },
    },
}
MODELS = {"mae": ModelConfig(encoder="vit_tiny", vit_heads=3)}
"""Encoders other than MODEL's thin ResNet (MAE needs a ViT: 16 px, 4 px patches, 16 tokens)."""
NOT_CONTRASTIVE = ("byol", "rotation", "mae", "simmim", "dino")
"""Methods without InfoNCE candidates (no ``infonce_bound_nats``)."""
MASKED_PATCHES = 16  # MAE: 4x4 tokens; SimMIM: 4 px squares of a 16 px image
DINO_LOCAL, DINO_LOCAL_SIZE = 2, 8  # DINO: local crops per image and their side


def _build(spec: dict[str, Any], bn_eval: bool) -> SSLMethod:
    """The same float64 method on every rank and in the parent (seeded, randomised BN)."""
    torch.manual_seed(0)
    cfg = MethodConfig(**spec, queue_size=QUEUE, temperature=0.3, momentum=0.9)
    method = build_method(cfg, MODELS.get(spec["name"], MODEL), CHANS, SIZE).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in method.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.affine:
                    module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                    module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(0.2 * torch.randn(module.num_features, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))
        # Key networks that differ from the online ones, so the keys are not the queries.
        for target, _ in method.momentum_pairs():
            for p in target.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    method.train()
    if bn_eval:
        for module in method.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return method


def _views(step: int, global_size: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    shape = (global_size, CHANS, SIZE, SIZE)
    x1 = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x1, torch.randn(shape, generator=gen, dtype=torch.float64)


def _inputs(spec: dict[str, Any], step: int, global_size: int, rows: slice) -> tuple[Tensor, ...]:
    """This rank's forward arguments, cut from one global batch: two views (and SimCLR's
    quarter-turns with its rotation loss); one view rotated four times (rotation); one view and
    its masking noise (MAE, SimMIM)."""
    name = spec["name"]
    x1, x2 = _views(step, global_size)
    if spec.get("rotation_weight"):
        turns = torch.randint(0, 4, (global_size,), generator=torch.Generator().manual_seed(step))
        return x1[rows], x2[rows], turns[rows]
    if name == "rotation":
        x = x1[rows]
        rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        return rotated, torch.arange(4).repeat_interleave(x.shape[0])
    if name in ("mae", "simmim"):
        gen = torch.Generator().manual_seed(200 + step)
        noise = torch.rand(global_size, MASKED_PATCHES, generator=gen, dtype=torch.float64)
        return x1[rows], noise[rows]
    if name == "dino":
        gen = torch.Generator().manual_seed(300 + step)
        shape = (global_size, DINO_LOCAL, CHANS, DINO_LOCAL_SIZE, DINO_LOCAL_SIZE)
        local = torch.randn(shape, generator=gen, dtype=torch.float64)
        return x1[rows], x2[rows], local[rows]
    return x1[rows], x2[rows]


def _train(spec: dict[str, Any], rank: int, world_size: int, per_rank: int) -> dict[str, Any]:
    """STEPS steps on this rank's slice; gradients and logged losses averaged over ranks."""
    method = _build(spec, bn_eval=True)
    params = method.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=0.5)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    losses, local_losses, first_grads, bounds = [], [], [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss, metrics = method(*_inputs(spec, step, world_size * per_rank, rows))
        if "infonce_bound_nats" in metrics:
            bounds.append(metrics["infonce_bound_nats"])
        loss.backward()
        for p in params:
            assert p.grad is not None
            p.grad = collectives.all_reduce_mean(p.grad)
        if step == 0:
            first_grads = [p.grad.clone() for p in params if p.grad is not None]
        losses.append(collectives.all_reduce_mean(loss))
        local_losses.append(loss.detach())
        optimizer.step()
        method.momentum_update(step + 1, STEPS)
    return {
        "losses": torch.stack(losses),
        "local_losses": torch.stack(local_losses),
        "grads": first_grads,
        "bounds": bounds,
        "state": {k: v.detach().clone() for k, v in method.state_dict().items()},
    }


def _shuffle_bn_train(rank: int, world_size: int, per_rank: int) -> dict[str, Tensor]:
    """One MoCo v2 step with shuffle-BN and BN in training mode; returns the enqueued keys."""
    method = _build(SPECS["moco_v2_shuffle_bn"], bn_eval=False)
    assert isinstance(method, MoCoV2)
    x1, x2 = _views(0, world_size * per_rank)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    torch.manual_seed(SHUFFLE_SEED)  # rank 0's permutation is the first draw in forward
    method(x1[rows], x2[rows])
    return {"queue": method.queue.clone(), "ptr": method.queue_ptr.clone()}


def _worker(rank: int, world_size: int, per_rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: _train(s, rank, world_size, per_rank) for name, s in SPECS.items()}
    out["shuffle_bn_train"] = _shuffle_bn_train(rank, world_size, per_rank)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    world_size = request.param
    return world_size, run_world(_worker, world_size, PER_RANK, timeout=240)


@pytest.mark.parametrize("name", list(SPECS))
def test_world_training_equals_single_process(world, name: str) -> None:
    world_size, results = world
    assert collectives.world_size() == 1  # the parent has no process group: the reference
    expected = _train(SPECS[name], 0, 1, world_size * PER_RANK)
    assert all(torch.count_nonzero(g) > 0 for g in expected["grads"][:3])
    for rank, result in enumerate([r[name] for r in results]):
        torch.testing.assert_close(result["losses"], expected["losses"], rtol=RTOL, atol=ATOL)
        assert len(result["grads"]) == len(expected["grads"])
        for i, (got, want) in enumerate(zip(result["grads"], expected["grads"], strict=True)):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=f"rank {rank} grad {i}")
        assert result["state"].keys() == expected["state"].keys()
        for key, want in expected["state"].items():
            torch.testing.assert_close(
                result["state"][key], want, rtol=RTOL, atol=ATOL, msg=f"rank {rank} {key}"
            )
    # Ranks saw different images: their own losses differ, only the mean matches.
    assert results[0][name]["local_losses"][0] != results[1][name]["local_losses"][0]


@pytest.mark.parametrize("name", ["moco_v2", "moco_v2_shuffle_bn"])
def test_moco_v2_queue_is_identical_on_every_rank(world, name: str) -> None:
    world_size, results = world
    states = [r[name]["state"] for r in results]
    for state in states[1:]:
        assert torch.equal(state["queue"], states[0]["queue"])
        assert torch.equal(state["queue_ptr"], states[0]["queue_ptr"])
    assert int(states[0]["queue_ptr"]) == (STEPS * world_size * PER_RANK) % QUEUE
    assert int(states[0]["queue_filled"]) == min(QUEUE, STEPS * world_size * PER_RANK)


def test_shuffle_bn_encodes_permuted_slices_and_unshuffles(world) -> None:
    """BN in training mode: key i must come from the rank slice of the permuted global batch
    that holds image i, with that slice's BN statistics, and be enqueued in global order."""
    world_size, results = world
    n_global = world_size * PER_RANK
    method = _build(SPECS["moco_v2_shuffle_bn"], bn_eval=False)
    assert isinstance(method, MoCoV2)
    _, x2 = _views(0, n_global)
    torch.manual_seed(SHUFFLE_SEED)
    perm = torch.randperm(n_global)
    shuffled = x2[perm]
    chunks = [shuffled[r * PER_RANK : (r + 1) * PER_RANK] for r in range(world_size)]
    keys = torch.cat([method.keys(c) for c in chunks])[torch.argsort(perm)]
    expected = F.normalize(keys, dim=1)
    plain = F.normalize(
        torch.cat([method.keys(x2[r * PER_RANK : (r + 1) * PER_RANK]) for r in range(world_size)]),
        dim=1,
    )
    # Without the shuffle each rank's BN statistics would differ: the check is not vacuous.
    assert (expected - plain).abs().max() > 1e-3
    for rank, result in enumerate(r["shuffle_bn_train"] for r in results):
        torch.testing.assert_close(
            result["queue"][:n_global], expected, rtol=RTOL, atol=ATOL, msg=f"rank {rank}"
        )
        assert int(result["ptr"]) == n_global % QUEUE
        # The rest of the queue is still the seeded initial queue.
        torch.testing.assert_close(result["queue"][n_global:], method.queue[n_global:])


def _candidates(name: str, n_global: int) -> int:
    """InfoNCE candidates per anchor: the gathered global batch, or the queue."""
    return {"simclr": 2 * n_global - 1, "moco_v3": n_global}.get(name, 1 + QUEUE)


BOUND_SPECS = [n for n, s in SPECS.items() if s["name"] not in NOT_CONTRASTIVE]
"""Specs whose loss is NT-Xent / InfoNCE alone (SimCLR's rotation term left out)."""


@pytest.mark.parametrize("name", [n for n in BOUND_SPECS if "rotation_weight" not in SPECS[n]])
def test_infonce_bound_counts_the_gathered_candidates(world, name: str) -> None:
    """Each rank's bound is log(N) - L of its own loss, N counted over the whole world (the
    loss without SimCLR's rotation term, which the bound leaves out)."""
    world_size, results = world
    n = _candidates(name, world_size * PER_RANK)
    assert n != _candidates(name, PER_RANK) or name.startswith("moco_v2")
    scale = 4 * 0.3 if name == "moco_v3" else 1.0  # MoCo v3's loss is 2 T (L1 + L2)
    for rank, result in enumerate(r[name] for r in results):
        assert len(result["bounds"]) == STEPS
        for bound, loss in zip(result["bounds"], result["local_losses"], strict=True):
            want = math.log(n) - float(loss) / scale
            assert float(bound) == pytest.approx(want, rel=1e-5, abs=1e-5), f"rank {rank}"


def test_dino_center_is_the_global_batch_one(world) -> None:
    """The centre is all-reduced: every rank holds the same one, the single process's (compared
    with the other state above), and it moved from zero; the temperature schedule advanced."""
    _, results = world
    states = [r["dino"]["state"] for r in results]
    assert float(states[0]["center"].abs().max()) > 1e-3
    for state in states[1:]:
        assert torch.equal(state["center"], states[0]["center"])
    assert all(int(state["steps_done"]) == STEPS for state in states)
