"""SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020 (Algorithm 1)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ssl_dist.config import Config, MethodConfig, ModelConfig
from ssl_dist.data.shards import Manifest
from ssl_dist.data.views import TwoViewInputs
from ssl_dist.dist import collectives
from ssl_dist.losses import infonce_bound, nt_xent_loss
from ssl_dist.methods.base import SSLMethod, num_features, pair_metrics
from ssl_dist.methods.rotation import ROTATIONS, rotate_each, rotation_head, rotation_loss
from ssl_dist.models import build_projector

ROTATION_SEED = 0x524F54
"""Mixed into the batch seed for the quarter-turns (a stream apart from the views')."""


class RotatedPairInputs:
    """``(x1, x2, k)``: two views of each image (:class:`TwoViewInputs`), both turned by the
    same random number of quarter-turns ``k [N]`` (uniform over 0..3, seeded by the batch seed),
    for SimCLR's auxiliary rotation loss."""

    def __init__(self, pairs: TwoViewInputs) -> None:
        self.pairs = pairs
        self.crop_scale = pairs.crop_scale  # loader crops pass through

    def __call__(self, batch, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        x1, x2 = self.pairs(batch, seed)
        g = torch.Generator().manual_seed(seed ^ ROTATION_SEED)
        k = torch.randint(0, ROTATIONS, (x1.shape[0],), generator=g).to(x1.device)
        return rotate_each(x1, k), rotate_each(x2, k), k


class SimCLR(SSLMethod):
    """Encoder + MLP projector trained with NT-Xent over the (gathered) global batch.

    Both views go through the networks as ONE batch ``[2N, ...]``, as in the reference
    implementation (``tf.concat(features_list, 0)``), so BatchNorm statistics span both views.
    With ``cfg.gather`` every rank sees the 2 * global batch - 2 negatives of the whole world.

    ``cfg.rotation_weight`` > 0 adds rotation prediction (Gidaris et al. 2018) as an auxiliary
    task at no extra forward pass: each image is turned, both views alike, by a random number of
    quarter-turns (:class:`RotatedPairInputs`), and a head on the backbone features of both
    views predicts it; the loss is NT-Xent + weight * cross-entropy. The contrastive pairs stay
    pairs (same turn); the backbone must also keep the image's orientation, which NT-Xent alone
    may discard (what rotation prediction on its own learns scores well in kNN on this project's
    Fashion-MNIST bench).

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
        features = num_features(self.encoder)
        self.projector = build_projector(model, features)
        self.rotation_head = (
            rotation_head(features, model.proj_hidden) if method.rotation_weight > 0 else None
        )

    def make_inputs(
        self, cfg: Config, manifest: Manifest, device: torch.device | str
    ) -> TwoViewInputs | RotatedPairInputs:
        pairs = super().make_inputs(cfg, manifest, device)
        assert isinstance(pairs, TwoViewInputs)
        return RotatedPairInputs(pairs) if self.rotation_head is not None else pairs

    def example_inputs(self, n: int, channels: int, size: int) -> tuple[Tensor, ...]:
        views = super().example_inputs(n, channels, size)
        if self.rotation_head is None:
            return views
        return *views, torch.randint(0, ROTATIONS, (n,))

    def forward(
        self, x1: Tensor, x2: Tensor, k: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x1, x2: views ``[N, C, H, W]``; k: their quarter-turns ``[N]`` (with
        ``rotation_weight`` > 0). Returns: NT-Xent loss over local anchors (+ the weighted
        rotation loss) and ``pos_sim`` (of projections), ``alignment`` / ``uniformity`` (of
        backbone features), ``infonce_bound_nats`` (``log(2 N_g - 1) - NT-Xent``: each
        anchor's softmax runs over the 2 N_g views of the gathered global batch but itself;
        N_g = N without ``gather``), and with the rotation task ``rot_loss`` / ``rot_acc``."""
        self.check_views(x1, x2)
        if (k is None) != (self.rotation_head is None):
            raise ValueError("quarter-turns k are given exactly when rotation_weight > 0")
        n = x1.shape[0]
        h = self.encoder(torch.cat([x1, x2], dim=0))  # [2N, F]
        z = self.projector(h)  # [2N, D]
        loss = nt_xent_loss(z[:n], z[n:], self.cfg.temperature, gather=self.cfg.gather)
        metrics = pair_metrics(h[:n], h[n:], z[:n], z[n:])
        n_global = n * (collectives.world_size() if self.cfg.gather else 1)
        metrics["infonce_bound_nats"] = infonce_bound(loss, 2 * n_global - 1)
        if self.rotation_head is not None and k is not None:
            rot, metrics["rot_acc"] = rotation_loss(self.rotation_head, h, torch.cat([k, k]))
            metrics["rot_loss"] = rot.detach()
            loss = loss + self.cfg.rotation_weight * rot
        return loss, metrics
