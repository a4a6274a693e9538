"""Momentum (EMA) encoders for MoCo v2 / v3.

MoCo (He et al. 2020, eq. 2): ``theta_k <- m * theta_k + (1 - m) * theta_q``. MoCo v3 (Chen et
al. 2021) raises ``m`` from its base value to 1 with a half-cosine over training
(``adjust_moco_momentum`` in facebookresearch/moco-v3 ``main_moco.py``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """Move ``target`` towards ``online`` in place.

    Parameters: ``t = m * t + (1 - m) * o``. Buffers (BN running statistics, the batch counter)
    are copied from ``online``, as in MoCo's reference code, which only averages parameters and
    lets the key encoder's BN keep its own batch statistics in train mode.

    Args:
        target: Momentum copy; same architecture as ``online``.
        online: Module trained by gradient.
        momentum: ``m`` in [0, 1]; 1 leaves the target parameters unchanged.
    """
    t_named = list(target.named_parameters())
    o_named = list(online.named_parameters())
    if [n for n, _ in t_named] != [n for n, _ in o_named]:
        raise ValueError("ema_update: target and online modules have different parameters")
    t_params = [p.data for _, p in t_named]
    o_params = [p.data for _, p in o_named]
    if t_params:
        # foreach: one kernel launch per op for all tensors instead of one per parameter.
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)
    for (tn, tb), (on, ob) in zip(target.named_buffers(), online.named_buffers(), strict=True):
        if tn != on:
            raise ValueError(f"ema_update: buffer {tn!r} does not match {on!r}")
        tb.copy_(ob)


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Half-cosine momentum schedule from ``base`` (step 0) to ``final`` (``total_steps``).

    ``m = final - (final - base) * (cos(pi * step / total) + 1) / 2``; with ``final = 1`` this is
    MoCo v3's ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``. Steps outside
    ``[0, total_steps]`` are clamped.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` with every parameter frozen (``requires_grad=False``).

    The copy starts equal to the online module, as in MoCo (``param_k.data.copy_(param_q.data)``).
    """
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target
