"""SimMIM for ResNets: Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu, "SimMIM: A Simple Framework for
Masked Image Modeling", CVPR 2022 (arXiv 2111.09886; reference code microsoft/SimMIM
``models/simmim.py``).

Random squares of ``method.masked.mask_patch`` pixels (``mask_ratio`` of them per image, chosen
by sorting per-image noise as MAE does) are set to zero in the normalised image, i.e. to the
dataset mean: a CNN has no tokens, so the reference's learned mask token (added at the patch
embedding of a ViT / Swin) becomes a constant at the pixel level, the simplest correct form for
a convolutional encoder. The full encoder runs on the masked image; its last feature map (before
pooling, stride s) goes through SimMIM's one-layer head, a 1x1 convolution to ``s * s * C``
channels and a pixel shuffle back to the input resolution; the loss is the mean squared error
(per-patch normalised pixels with ``norm_pix_loss``, as MAE) over the masked squares only. The
reference uses L1 on raw pixels; MSE on normalised pixels keeps one loss for both methods.

A name of its own rather than ``mae`` picking a variant by encoder: the two differ in what the
encoder sees (all pixels vs the visible tokens), in the head and in the config fields they read,
and the recorded ``method.name`` should say which algorithm ran. ViTs train with ``mae``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssl_dist.config import Config, MethodConfig, ModelConfig
from ssl_dist.data.shards import Manifest
from ssl_dist.methods.base import SSLMethod, num_features
from ssl_dist.methods.masking import (
    MaskedInputs,
    keep_count,
    masked_pixel_loss,
    mim_views,
    patchify,
    random_masking,
)


def feature_map(encoder: nn.Module, x: Tensor) -> Tensor:
    """The last stage's feature map ``[N, F, H/s, W/s]`` of a ResNet encoder (thin or timm):
    the stem and the four stages, without the pooling."""
    e: Any = encoder
    h = e.maxpool(e.act1(e.bn1(e.conv1(x))))
    return e.layer4(e.layer3(e.layer2(e.layer1(h))))


class SimMIM(SSLMethod):
    """ResNet on the masked image + 1x1 conv / pixel-shuffle head, MSE on masked pixels.

    Args:
        method: Method config (``masked``: ``mask_ratio``, ``mask_patch``, ``norm_pix_loss``).
        model: Model config; the encoder must be a ResNet (``thin_resnet``, ``resnet18``,
            ``resnet50``).
        in_chans: Input channels.
        image_size: Input side (a multiple of ``mask_patch`` and of the encoder's stride).
    """

    name: ClassVar[str] = "simmim"

    def __init__(
        self, method: MethodConfig, model: ModelConfig, in_chans: int, image_size: int
    ) -> None:
        if model.encoder.startswith("vit"):
            raise ValueError(
                f"method simmim here trains ResNets, got {model.encoder}; "
                "ViTs train masked image modelling with method.name=mae"
            )
        super().__init__(method, model, in_chans, image_size)
        self.stride = 8 * (1 if model.small_stem else 4)  # stem (1 or 4) x three stride-2 stages
        self.mask_patch = method.masked.mask_patch
        if image_size % self.stride or image_size % self.mask_patch:
            raise ValueError(
                f"image_size {image_size} must be a multiple of the encoder stride {self.stride} "
                f"and of method.masked.mask_patch {self.mask_patch}"
            )
        grid = image_size // self.mask_patch
        self.num_patches = grid * grid
        self.keep = keep_count(self.num_patches, method.masked.mask_ratio)
        if self.keep >= self.num_patches:
            raise ValueError(f"method.masked.mask_ratio masks no patch of {grid}x{grid}")
        self.decoder = nn.Sequential(
            nn.Conv2d(num_features(self.encoder), self.stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    def make_inputs(
        self, cfg: Config, manifest: Manifest, device: torch.device | str
    ) -> MaskedInputs:
        return MaskedInputs(mim_views(cfg, manifest), self.num_patches, device)

    def pixel_mask(self, mask: Tensor, side: int) -> Tensor:
        """``[N, L]`` patch mask -> ``[N, 1, side, side]`` pixel mask (1 masked)."""
        grid = side // self.mask_patch
        m = mask.reshape(-1, 1, grid, grid)
        return m.repeat_interleave(self.mask_patch, 2).repeat_interleave(self.mask_patch, 3)

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x: one view ``[N, C, H, W]``; noise: masking noise ``[N, L]``. Returns: the
        masked-pixel MSE (a mean over local images, each masking the same number of squares)
        and ``mask_ratio``."""
        _, _, mask = random_masking(noise, self.keep)
        masked = x * (1 - self.pixel_mask(mask, x.shape[-1])).to(x.dtype)
        pred = self.decoder(feature_map(self.encoder, masked))  # [N, C, H, W]
        p = self.mask_patch
        loss = masked_pixel_loss(
            patchify(pred, p), patchify(x, p), mask, self.cfg.masked.norm_pix_loss
        )
        return loss, {"mask_ratio": mask.detach().float().mean()}
