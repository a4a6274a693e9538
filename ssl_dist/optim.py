"""Optimizers, parameter groups and the learning-rate schedule.

SimCLR (Chen et al. 2020, sec. B.1) trains with LARS, lr = 0.3 x batch / 256, a linear warm-up and
cosine decay, and excludes BN and bias parameters from both weight decay and the LARS adaptation;
MoCo v3 does the same for ResNets. LARS here is timm's ``timm.optim.Lars``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from timm.optim import Lars
from torch import nn

from ssl_dist.config import OptimConfig

LARS_TRUST_COEFF = 0.001
"""LARS eta (You et al. 2017; SimCLR's ``eeta``; timm's default)."""


def scaled_lr(
    base_lr: float, global_batch: int, base_batch: int, rule: Literal["linear", "sqrt", "none"]
) -> float:
    """Learning rate for ``global_batch`` given ``base_lr`` at ``base_batch``.

    ``linear``: Goyal et al. 2017; ``sqrt``: SimCLR's alternative for LARS (sec. B.1);
    ``none``: ``base_lr`` unchanged.
    """
    if global_batch < 1 or base_batch < 1:
        raise ValueError(f"batch sizes must be positive, got {global_batch}, {base_batch}")
    ratio = global_batch / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; use linear, sqrt or none")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Parameters with ``ndim <= 1`` (BN/LayerNorm weights and biases, all biases) and those the
    model or a submodule lists in ``no_weight_decay()`` (timm ViTs: ``pos_embed``,
    ``cls_token``) get ``weight_decay=0``, as timm's ``param_groups_weight_decay``. Each group
    carries a ``name`` (``"decay"`` / ``"no_decay"``) that :func:`build_optimizer` uses to decide
    LARS adaptation; torch optimizers keep unknown group keys untouched.

    Args:
        model: Module whose ``requires_grad`` parameters are grouped.
        weight_decay: Decay of the first group.

    Returns:
        ``[{"name": "decay", ...}, {"name": "no_decay", ...}]``; empty groups are dropped.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    skip: set[str] = set()
    for mod_name, mod in model.named_modules():  # also finds a ViT nested inside a wrapper
        fn = getattr(mod, "no_weight_decay", None)
        if callable(fn):
            skip |= {f"{mod_name}.{n}" if mod_name else n for n in fn()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _lars_groups(params_or_groups: Iterable[Any]) -> list[dict[str, Any]] | list[Any]:
    # timm's Lars adapts a group only when its weight_decay != 0 or always_adapt is set. Set
    # always_adapt per group so that (a) "no_decay" (BN, bias) is never adapted, as in SimCLR's
    # `exclude_from_layer_adaptation`, and (b) "decay" is adapted even when weight_decay is 0.
    items = list(params_or_groups)
    if not items or not isinstance(items[0], dict):
        return items
    return [{**g, "always_adapt": g.get("name") != "no_decay"} for g in items]


def build_optimizer(
    params_or_groups: Iterable[Any], cfg: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.name``.

    Args:
        params_or_groups: Parameters, or groups from :func:`param_groups` (recommended: they
            exclude BN/bias from decay and, for LARS, from adaptation). With plain parameters
            every parameter is decayed by ``cfg.weight_decay`` and, for LARS, adapted iff that
            decay is non-zero (timm's default).
        cfg: Optimizer config (``name``, ``weight_decay``, ``momentum``, ``betas``).
        lr: Learning rate, already scaled (see :func:`scaled_lr`); schedules overwrite it.
    """
    if cfg.name == "lars":
        return Lars(
            _lars_groups(params_or_groups),
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coeff=LARS_TRUST_COEFF,
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params_or_groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params_or_groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer {cfg.name!r}; use lars, sgd or adamw")


def lr_at(
    step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then half-cosine.

    Warm-up: ``peak * (step + 1) / warmup_steps`` for ``step < warmup_steps``, so step 0 already
    moves (no wasted zero-lr step) and step ``warmup_steps - 1`` reaches the peak. Then
    ``min + (peak - min) * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup) / (total - warmup)`` clamped to [0, 1] and ``min = peak * min_lr_ratio``
    (SGDR, Loshchilov & Hutter 2017; the SimCLR / MoCo v3 schedule).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    min_lr = peak_lr * min_lr_ratio
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    t = min(max(t, 0.0), 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
