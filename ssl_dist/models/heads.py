"""Projection and prediction MLP heads.

Layout follows MoCo v3's ``_build_mlp`` (facebookresearch/moco-v3, ``moco/builder.py``):
``Linear -> BN -> ReLU`` for every hidden layer, then a final ``Linear``, optionally followed by a
BN without affine parameters (MoCo v3's projector uses it, its predictor does not; SimCLR v2's
projector also ends in BN). A linear layer that feeds a BN has no bias (the BN's beta, or its mean
subtraction, makes it redundant); the last linear has a bias only when no BN follows.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_dist.config import ModelConfig


class Projector(nn.Module):
    """MLP projector ``[B, in_dim] -> [B, out_dim]``.

    Args:
        in_dim: Input features (the encoder's ``num_features``).
        hidden_dim: Width of the hidden layers.
        out_dim: Output width (the embedding the loss sees).
        num_layers: Linear layers, 2 (SimCLR v1, MoCo v2) or 3 (SimCLR v2, MoCo v3).
        last_bn: End with ``BatchNorm1d(out_dim, affine=False)`` (MoCo v3 projector).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be at least 2, got {num_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            last = i == num_layers - 1
            layers.append(nn.Linear(d_in, d_out, bias=last and not last_bn))
            if not last:
                layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
            elif last_bn:
                layers.append(nn.BatchNorm1d(d_out, affine=False))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``[B, in_dim]``. Returns: ``[B, out_dim]``."""
        return self.net(x)


class Predictor(Projector):
    """MoCo v3 predictor: 2-layer MLP ``[B, dim] -> [B, dim]``; the reference ends it with an
    affine-free BN for ViTs and without one for ResNets.

    Args:
        dim: Input and output width (the projector's ``out_dim``).
        hidden_dim: Hidden width.
        last_bn: End with ``BatchNorm1d(dim, affine=False)``.
    """

    def __init__(self, dim: int, hidden_dim: int, last_bn: bool = False) -> None:
        super().__init__(dim, hidden_dim, dim, num_layers=2, last_bn=last_bn)


def build_projector(cfg: ModelConfig, in_dim: int, last_bn: bool = False) -> Projector:
    """Projector from ``cfg.proj_hidden``, ``cfg.proj_dim`` and ``cfg.proj_layers``.

    Args:
        cfg: Model config.
        in_dim: Encoder feature width.
        last_bn: Final affine-free BN; pass True for MoCo v3 (not a config field).
    """
    return Projector(in_dim, cfg.proj_hidden, cfg.proj_dim, cfg.proj_layers, last_bn)


def build_predictor(cfg: ModelConfig) -> Predictor:
    """MoCo v3 predictor ``cfg.proj_dim -> cfg.pred_hidden -> cfg.proj_dim`` (final BN with
    ``cfg.pred_last_bn``)."""
    return Predictor(cfg.proj_dim, cfg.pred_hidden, cfg.pred_last_bn)
