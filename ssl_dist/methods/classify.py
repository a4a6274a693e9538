"""Supervised classification as a task on the seam: fine-tuning a pretrained encoder and the
supervised baseline of ``bench quality`` train through the same step loop as pretraining.

The model is the encoder plus a new head (parameter-free BatchNorm, then linear: MAE's
linear-probe head, so the head learns at one rate whatever the scale of the features) trained
with cross-entropy. Its inputs are the evaluation view of each image (resize, normalise),
optionally augmented on the device, and the labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.config import Config
from ssl_dist.data.shards import Manifest
from ssl_dist.data.views import TwoViews, views_for


class ClassifyInputs:
    """``(x, y)`` of a decoded batch on `device`: the plain view (resized, normalised), passed
    through `augment` (no gradient) when given, and the labels."""

    def __init__(
        self, views: TwoViews, device: torch.device | str = "cpu", augment: nn.Module | None = None
    ) -> None:
        self.device = torch.device(device)
        self.views = views.to(self.device)
        self.augment = augment.to(self.device) if augment is not None else None

    def __call__(self, batch, seed: int) -> tuple[Tensor, Tensor]:
        x = self.views.plain(batch.images.to(self.device, non_blocking=True))  # evaluation views
        if self.augment is not None:
            with torch.no_grad(), torch.random.fork_rng(devices=_cuda(self.device)):
                torch.manual_seed(seed)
                x = self.augment(x)
        return x, batch.labels.to(self.device, non_blocking=True)


def _cuda(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


class Classifier(nn.Module):
    """Encoder plus a new head (feature BN, linear). ``forward(x, y)`` is the training task
    (mean cross-entropy of this rank's samples, and top-1); :meth:`logits` serves evaluation.

    Args:
        encoder: Backbone ``[B, C, H, W] -> [B, F]`` with an int ``num_features``.
        num_classes: Outputs of the head.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        features = int(getattr(encoder, "num_features", 0))
        if features <= 0:
            raise ValueError("the encoder has no num_features")
        linear = nn.Linear(features, num_classes)
        nn.init.normal_(linear.weight, std=0.01)  # as MoCo v3 / MAE heads
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(features, affine=False), linear)

    def make_inputs(
        self,
        cfg: Config,
        manifest: Manifest,
        device: torch.device | str,
        augment: nn.Module | None = None,
    ) -> ClassifyInputs:
        return ClassifyInputs(views_for(cfg, manifest), device, augment)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.logits(x).float()
        loss = F.cross_entropy(logits, y)
        return loss, {"top1": (logits.detach().argmax(1) == y).float().mean()}
