"""Contrastive losses for SimCLR and MoCo, correct under data parallelism.

Pure tensor math; cross-rank communication goes only through :mod:`ssl_dist.dist.collectives`.

Gradient semantics (both losses). Each rank returns the mean over its LOCAL anchors/queries, so
the mean of the per-rank losses (what the trainer logs after ``all_reduce_mean``) equals the
loss of one process on the global batch of W*N. Gathered candidates carry gradients back with an
all-reduce SUM, so on rank r the gradient reaching its own rows is the gradient of
``sum_over_ranks(loss_r)`` = W * d(global loss)/d(rows). DDP / DeepSpeed then average parameter
gradients over ranks (divide by W), which gives exactly the gradient of the single-process
global loss. Do not rescale the loss by W in the trainer.

Logits are computed in float32 (float64 inputs stay float64): normalising and dividing by a
small temperature in bf16 would lose about 3 significant digits of the logits. Both losses turn
autocast off inside (:func:`ssl_dist.precision.full_precision`), so under bf16 mixed precision
their normalisation, logits and cross-entropy still run in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_dist.dist import collectives
from ssl_dist.precision import full_precision

_P = ParamSpec("_P")


def _autocast_off(fn: Callable[_P, Tensor]) -> Callable[_P, Tensor]:
    """Run `fn` with autocast off on the device of its first (tensor) argument."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Tensor:
        first = args[0]
        assert isinstance(first, Tensor)
        with full_precision(first.device.type):
            return fn(*args, **kwargs)

    return wrapper


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


@_autocast_off
def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float, gather: bool = True) -> Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

    Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020, Eq. (1) and Algorithm 1.

    Anchors are the 2N local views ``[z1; z2]``. Candidates are the 2*N_g views of the global
    batch (N_g = W*N), laid out as ``[z1_all; z2_all]`` with rank r's rows at ``r*N .. r*N+N-1``
    inside each half. For local row i of view 1 the positive is column ``N_g + r*N + i``; for
    local row i of view 2 it is column ``r*N + i``. The anchor itself is masked with -inf, so each
    anchor has 1 positive and 2*N_g - 2 negatives. See the module docstring for how per-rank
    losses and gradients relate to the global batch.

    Args:
        z1: First-view projections [N, D], any float dtype.
        z2: Second-view projections [N, D]; row i is the same image as ``z1[i]``.
        temperature: Softmax temperature tau > 0.
        gather: If True, negatives come from every rank (``all_gather_with_grad``); every rank
            must then call this with the same N and D. If False, only local negatives.

    Returns:
        Scalar loss, mean over the 2N local anchors, float32 (float64 for float64 inputs).

    Raises:
        ValueError: for mismatched shapes, temperature <= 0, or per-rank sizes that differ.
    """
    _check_temperature(temperature)
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {tuple(z1.shape)}, {tuple(z2.shape)}")
    dtype = _compute_dtype(z1)
    z1 = F.normalize(z1.to(dtype), dim=1)
    z2 = F.normalize(z2.to(dtype), dim=1)
    n, dim = z1.shape

    if gather:
        # One collective for both views: gather [N, 2D] and split.
        pairs = collectives.all_gather_with_grad(torch.cat([z1, z2], dim=1))  # [N_g, 2D]
        z1_all, z2_all = pairs[:, :dim], pairs[:, dim:]
        offset = collectives.rank() * n
    else:
        z1_all, z2_all, offset = z1, z2, 0
    n_global = z1_all.shape[0]

    anchors = torch.cat([z1, z2], dim=0)  # [2N, D]
    candidates = torch.cat([z1_all, z2_all], dim=0)  # [2N_g, D]
    logits = anchors @ candidates.T / temperature  # [2N, 2N_g]

    local = torch.arange(n, device=z1.device)
    self_col = torch.cat([offset + local, n_global + offset + local])  # [2N]
    positive_col = torch.cat([n_global + offset + local, offset + local])  # [2N]
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * n, device=z1.device), self_col] = True
    # -inf drops the self term from the log-sum-exp; its softmax gradient is exactly 0.
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positive_col)


@_autocast_off
def info_nce_loss(
    q: Tensor,
    k: Tensor,
    temperature: float,
    queue: Tensor | None = None,
    gather: bool = True,
) -> Tensor:
    """InfoNCE between queries and momentum-encoder keys, as in MoCo.

    Without a queue (MoCo v3: Chen, Xie, He, "An Empirical Study of Training Self-Supervised
    Vision Transformers", ICCV 2021, Algorithm 1): keys are gathered from every rank (no
    gradient) to [N_g, D], logits are ``q @ k_all.T / temperature`` [N, N_g] and the positive of
    local query i is key ``r*N + i``. The v3 reference code multiplies this loss by
    ``2 * temperature``; this function returns the plain mean cross-entropy and the MoCo v3
    method applies that factor if configured.

    With a queue (MoCo v2: He et al., "Momentum Contrast for Unsupervised Visual Representation
    Learning", CVPR 2020, Algorithm 1; Chen et al., "Improved Baselines with Momentum
    Contrastive Learning", 2020): logits are ``[q.k, q @ queue.T] / temperature`` [N, 1+K] with
    label 0. Nothing is gathered for the loss; gathering keys to enqueue is the method's job.

    Args:
        q: Local queries [N, D], with gradient; any float dtype.
        k: Keys [N, D] from the momentum encoder; detached here.
        temperature: Softmax temperature tau > 0.
        queue: Optional negatives [K, D] (detached; rows are re-normalised, which is a no-op for
            stored normalised keys).
        gather: Queue-free mode only: gather keys from every rank (same N and D on all ranks).

    Returns:
        Scalar loss, mean over the N local queries, float32 (float64 for float64 inputs).

    Raises:
        ValueError: for mismatched shapes, temperature <= 0, or per-rank sizes that differ.
    """
    _check_temperature(temperature)
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [N, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    dtype = _compute_dtype(q)
    q = F.normalize(q.to(dtype), dim=1)
    # Keys are targets: no gradient into the momentum encoder.
    k = F.normalize(k.detach().to(dtype), dim=1)
    n = q.shape[0]

    if queue is not None:
        if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(f"queue must be [K, {q.shape[1]}], got {tuple(queue.shape)}")
        negatives = F.normalize(queue.detach().to(dtype), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
        logits = torch.cat([positive, q @ negatives.T], dim=1) / temperature  # [N, 1+K]
        labels = torch.zeros(n, dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)

    if gather:
        k_all = collectives.all_gather_no_grad(k)  # [N_g, D]
        offset = collectives.rank() * n
    else:
        k_all, offset = k, 0
    logits = q @ k_all.T / temperature  # [N, N_g]
    labels = offset + torch.arange(n, device=q.device)
    return F.cross_entropy(logits, labels)


def infonce_bound(loss: Tensor, candidates: int) -> Tensor:
    """The InfoNCE lower bound on mutual information, ``log(N) - L`` in nats.

    van den Oord, Li, Vinyals, "Representation Learning with Contrastive Predictive Coding",
    2018, sec. 2.3: ``I(x; c) >= log(N) - L_N``, where ``L_N`` is the InfoNCE loss (mean
    cross-entropy of the positive among N candidates per anchor: 1 positive, N - 1 negatives).
    At chance (uniform logits) ``L_N = log N`` and the bound is 0; it can never exceed
    ``log N``, so it saturates once the loss nears 0 (larger N, a higher ceiling).

    Args:
        loss: The InfoNCE loss ``L_N`` (a scalar, the mean over anchors, without temperature
            rescaling such as MoCo v3's ``2 * T``).
        candidates: N, the candidates each anchor's softmax runs over (positive included):
            SimCLR ``2 * N_g - 1``, MoCo v3 ``N_g``, MoCo v2 ``1 + K``.

    Returns:
        Detached float32 scalar.

    Raises:
        ValueError: for fewer than one candidate.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    value = loss.detach().float()
    return value.new_tensor(float(candidates)).log() - value
