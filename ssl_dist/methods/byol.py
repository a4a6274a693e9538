"""BYOL: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020 (sec. 3.1 and Algorithm 1; reference code google-deepmind/deepmind-research
``byol/byol_experiment.py``, and lightly's ``examples/pytorch/byol.py``).

No negatives: an online network (encoder -> projector -> predictor) regresses the projections
of a momentum target network (encoder -> projector, an EMA of the online ones) of the other
view. Nothing crosses ranks but the gradient average the trainer does: the loss is a mean of
per-image terms, so W ranks of N images give the gradient of one process on W * N images
(BatchNorm aside, whose statistics are per rank as in any data-parallel run without SyncBN).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.config import MethodConfig, ModelConfig
from ssl_dist.methods.base import SSLMethod, num_features, pair_metrics
from ssl_dist.models import build_predictor, build_projector, cosine_momentum, make_momentum_copy
from ssl_dist.precision import full_precision


def regression_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's per-image loss ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)`` (eq. 2), ``[N]``.

    Computed in float32 (float64 inputs stay float64) with autocast off; `z` is the target and
    is detached (the stop-gradient of the paper).

    Args: p: online predictions ``[N, D]``; z: target projections ``[N, D]``.
    """
    if p.ndim != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must both be [N, D]; got {tuple(p.shape)}, {tuple(z.shape)}")
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    with full_precision(p.device.type):
        p = F.normalize(p.to(dtype), dim=1)
        z = F.normalize(z.detach().to(dtype), dim=1)
        return 2 - 2 * (p * z).sum(dim=1)


class BYOL(SSLMethod):
    """Online encoder + projector + predictor against a frozen momentum target (encoder +
    projector, ``requires_grad=False``, moved by EMA after each optimizer step).

    Loss (symmetrised, as the paper's ``L + L~``): the mean over local images of
    ``(2 - 2 cos(p1, sg(z2'))) + (2 - 2 cos(p2, sg(z1')))``, with ``p = predictor(projector(
    encoder(x)))`` online and ``z' = target_projector(target_encoder(x))``; 0 when every
    prediction points at its target, 8 at most. The momentum follows the half-cosine from
    ``cfg.momentum`` (the paper's base is 0.996) to ``cfg.momentum_final`` (1.0), as in MoCo v3.
    Projector and predictor are MLPs with BN in the hidden layer and none at the end (the
    paper's 4096 -> 256 heads, here ``model.proj_hidden`` / ``proj_dim`` / ``pred_hidden``).
    The target networks follow the module's train / eval mode (batch statistics in training,
    as in the reference code).

    Args:
        method: Method config (``momentum``, ``momentum_final``; ``temperature``, ``gather``
            and the queue are not used).
        model: Model config (encoder, projector and predictor widths).
        in_chans: Input channels.
        image_size: Input side (ViTs are built for it).
    """

    name: ClassVar[str] = "byol"

    def __init__(
        self, method: MethodConfig, model: ModelConfig, in_chans: int, image_size: int
    ) -> None:
        super().__init__(method, model, in_chans, image_size)
        self.projector = build_projector(model, num_features(self.encoder))
        self.predictor = build_predictor(model)
        self.momentum_encoder = make_momentum_copy(self.encoder)
        self.momentum_projector = make_momentum_copy(self.projector)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.momentum_encoder, self.encoder), (self.momentum_projector, self.projector)]

    def momentum_at(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.cfg.momentum, self.cfg.momentum_final)

    @torch.no_grad()
    def targets(self, x: Tensor) -> Tensor:
        """Target projections ``[N, C, H, W] -> [N, D]``, no gradient."""
        return self.momentum_projector(self.momentum_encoder(x))

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x1, x2: views ``[N, C, H, W]``. Returns: the symmetric loss (mean over local
        images) and ``pos_sim`` (predictions vs targets), ``alignment`` / ``uniformity``
        (backbone)."""
        self.check_views(x1, x2)
        h1, h2 = self.encoder(x1), self.encoder(x2)  # [N, F]; separate BN batches per view
        p1, p2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))  # [N, D]
        z1, z2 = self.targets(x1), self.targets(x2)  # [N, D]
        loss = (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()
        metrics = pair_metrics(h1, h2, torch.cat([p1, p2]), torch.cat([z2, z1]))
        return loss, metrics
