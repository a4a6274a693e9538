"""SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020 (Algorithm 1)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ssl_dist.config import MethodConfig, ModelConfig
from ssl_dist.dist import collectives
from ssl_dist.losses import infonce_bound, nt_xent_loss
from ssl_dist.methods.base import SSLMethod, num_features, pair_metrics
from ssl_dist.models import build_projector


class SimCLR(SSLMethod):
    """Encoder + MLP projector trained with NT-Xent over the (gathered) global batch.

    Both views go through the networks as ONE batch ``[2N, ...]``, as in the reference
    implementation (``tf.concat(features_list, 0)``), so BatchNorm statistics span both views.
    With ``cfg.gather`` every rank sees the 2 * global batch - 2 negatives of the whole world.

    Args:
        method: Method config (``temperature``, ``gather``).
        model: Model config (encoder and projector widths).
        in_chans: Input channels.
        image_size: Input side (ViTs are built for it).
    """

    name: ClassVar[str] = "simclr"

    def __init__(
        self, method: MethodConfig, model: ModelConfig, in_chans: int, image_size: int
    ) -> None:
        super().__init__(method, model, in_chans, image_size)
        self.projector = build_projector(model, num_features(self.encoder))

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x1, x2: views ``[N, C, H, W]``. Returns: NT-Xent loss over local anchors and
        ``pos_sim`` (of projections), ``alignment`` / ``uniformity`` (of backbone features),
        ``infonce_bound_nats`` (``log(2 N_g - 1) - loss``: each anchor's softmax runs over the
        2 N_g views of the gathered global batch but itself; N_g = N without ``gather``)."""
        self.check_views(x1, x2)
        n = x1.shape[0]
        h = self.encoder(torch.cat([x1, x2], dim=0))  # [2N, F]
        z = self.projector(h)  # [2N, D]
        loss = nt_xent_loss(z[:n], z[n:], self.cfg.temperature, gather=self.cfg.gather)
        metrics = pair_metrics(h[:n], h[n:], z[:n], z[n:])
        n_global = n * (collectives.world_size() if self.cfg.gather else 1)
        metrics["infonce_bound_nats"] = infonce_bound(loss, 2 * n_global - 1)
        return loss, metrics
