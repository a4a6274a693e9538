"""Rotation prediction: Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by
Predicting Image Rotations", ICLR 2018 (RotNet; reference code gidariss/FeatureLearningRotNet).

Every image of the batch is shown at 0, 90, 180 and 270 degrees in the same batch (the paper's
best setting: "all four rotations ... simultaneously", sec. 3.2), and a head on the pooled
features predicts which rotation it sees; the loss is the mean cross-entropy over the 4N
rotated images. Each image is first augmented once (the first view's recipe: random resized
crop, flip, colour; RotNet used crops and flips), then rotated: rotating a square image keeps
its shape, so the four copies batch together.

The head is a small MLP (hidden width ``model.proj_hidden``, BN, ReLU) rather than the paper's
linear classifier on a deeper conv block, so that the encoder stays the same backbone the other
methods train and evaluate.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.config import Config, MethodConfig, ModelConfig
from ssl_dist.data.shards import Manifest
from ssl_dist.data.views import TwoViews, views_for
from ssl_dist.methods.base import SSLMethod, num_features

ROTATIONS = 4
"""0, 90, 180 and 270 degrees."""


def rotation_head(features: int, hidden: int) -> nn.Sequential:
    """MLP ``[B, features] -> [B, 4]`` (hidden width `hidden`, BN, ReLU): which rotation."""
    return nn.Sequential(
        nn.Linear(features, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, ROTATIONS),
    )


def rotate_each(x: Tensor, k: Tensor) -> Tensor:
    """Image i of ``x [N, C, H, W]`` (square) turned by ``k[i]`` quarter-turns (``k [N]`` in
    0..3, on x's device), counter-clockwise as :func:`torch.rot90`."""
    out = x.clone()
    for j in range(1, ROTATIONS):
        hit = k == j
        out[hit] = torch.rot90(x[hit], j, dims=(2, 3))
    return out


def rotation_loss(head: nn.Module, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of `head`'s rotation logits on features ``h [B, F]`` against ``y [B]``,
    in float32 (float64 stays float64), and the share of rotations recognised (detached)."""
    logits = head(h)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, y), (logits.detach().argmax(1) == y).float().mean()


class RotationInputs:
    """``(x, y)``: the four rotations of one augmented view per image ``[4N, C, H, W]`` (rotation
    k of every image, then k + 1) and the rotation index of each ``[4N]``, on `device`."""

    def __init__(self, views: TwoViews, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.views = views.to(self.device)

    def __call__(self, batch, seed: int) -> tuple[Tensor, Tensor]:
        x = self.views.single(batch.eval_images().to(self.device, non_blocking=True), seed=seed)
        rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
        y = torch.arange(ROTATIONS, device=self.device).repeat_interleave(x.shape[0])
        return rotated, y


class Rotation(SSLMethod):
    """Encoder + MLP head predicting the rotation (4 classes), cross-entropy.

    Args:
        method: Method config (nothing of it is used: the task has no temperature or target).
        model: Model config (encoder; ``proj_hidden`` sizes the head).
        in_chans: Input channels.
        image_size: Input side (the views are square, so rotations keep the shape).
    """

    name: ClassVar[str] = "rotation"

    def __init__(
        self, method: MethodConfig, model: ModelConfig, in_chans: int, image_size: int
    ) -> None:
        super().__init__(method, model, in_chans, image_size)
        self.head = rotation_head(num_features(self.encoder), model.proj_hidden)

    def make_inputs(
        self, cfg: Config, manifest: Manifest, device: torch.device | str
    ) -> RotationInputs:
        return RotationInputs(views_for(cfg, manifest), device)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x: rotated images ``[4N, C, H, W]``; y: rotation indices ``[4N]``.
        Returns: mean cross-entropy and ``rot_acc`` (share of rotations recognised)."""
        loss, acc = rotation_loss(self.head, self.encoder(x), y)
        return loss, {"rot_acc": acc}
