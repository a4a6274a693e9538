"""Backbone encoders: timm ResNets / ViTs and a thin CPU-sized ResNet.

Every encoder returns pooled features ``[B, F]`` (timm models are built with ``num_classes=0``)
and exposes ``num_features: int``. Nothing is downloaded: timm models use ``pretrained=False``.

Initialisation (documented because SSL results depend on it):

* ResNets (timm and thin): convolutions use Kaiming-normal, ``mode="fan_out"``, ReLU gain, as
  torchvision / timm ``ResNet.init_weights``; BatchNorm starts at gamma=1, beta=0. With
  ``zero_init_residual=True`` (the default, as in the SimCLR and MoCo reference code which use
  torchvision's ``zero_init_residual=True``; Goyal et al. 2017, sec. 5.1) the last BN gamma of each
  residual branch is zero, so every block starts as the identity. This is timm's
  ``zero_init_last``.
* ViTs: timm's default ``VisionTransformer`` init (truncated normal std 0.02 for linear layers and
  position embedding, zeros for biases). They have no BN; ``zero_init_residual`` is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.models.resnet import BasicBlock
from torch import nn

if TYPE_CHECKING:  # at run time this module needs torch and timm only: the registered model
    # ships it as its architecture code (see ssl_dist.mlflow_model)
    from ssl_dist.config import ModelConfig

THIN_LAYERS: tuple[int, int, int, int] = (2, 2, 2, 2)
"""Blocks per stage of ``thin_resnet``: ResNet-18's topology (BasicBlock x [2, 2, 2, 2]) at the
widths of ``ModelConfig.widths``. Two blocks per stage rather than one keeps the same depth as the
resnet18 it stands in for, so results transfer in kind; at widths (16, 32, 64, 128) and 32 px it
costs about 35 M multiply-adds per image."""

_TIMM_NAMES = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
}

SMALL_PATCH = 4
"""ViT patch size with ``small_stem``: 32 px images give an 8x8 token grid (as in CIFAR ViTs)."""


def _init_conv(conv: nn.Conv2d) -> None:
    # Same as torchvision / timm ResNet.init_weights.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


class ThinResNet(nn.Module):
    """A small ResNet built from timm's ``BasicBlock`` with configurable stage widths.

    Written out rather than built with ``timm.models.resnet.ResNet``: timm's default stem always
    has 64 channels (``stem_width`` is ignored unless a deep stem is chosen) and the first stage
    is then built for 64 input channels, so replacing ``conv1``/``bn1`` afterwards is not enough.

    Args:
        widths: Output channels of the four stages; the stem has ``widths[0]`` channels.
        layers: Blocks per stage.
        in_chans: Input channels.
        small_stem: 3x3 stride-1 stem and no max-pool (for 28-32 px images); otherwise the
            ImageNet 7x7 stride-2 stem followed by a 3x3 stride-2 max-pool.
        zero_init_residual: Zero the last BN gamma of each residual branch.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        layers: Sequence[int] = THIN_LAYERS,
        in_chans: int = 3,
        small_stem: bool = True,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(layers) != 4 or min(widths) < 1 or min(layers) < 1:
            raise ValueError(
                f"thin_resnet needs 4 positive widths and layers, got {widths}, {layers}"
            )
        w0 = int(widths[0])
        if small_stem:
            self.conv1 = nn.Conv2d(in_chans, w0, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, w0, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(w0)
        self.act1 = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        inplanes = w0
        for i, (width, n) in enumerate(zip(widths, layers, strict=True)):
            stages.append(self._stage(inplanes, int(width), int(n), stride=1 if i == 0 else 2))
            inplanes = int(width)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)
            elif isinstance(m, BasicBlock) and zero_init_residual:
                m.zero_init_last()

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes:
            # ResNet "B" shortcut: 1x1 projection + BN when the shape changes.
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        mods = [BasicBlock(inplanes, planes, stride=stride, downsample=downsample)]
        mods += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``[B, C, H, W]``. Returns: pooled features ``[B, widths[-1]]``."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.pool(x).flatten(1)


def _timm_resnet(name: str, in_chans: int, small_stem: bool, zero_init: bool) -> nn.Module:
    model = timm.create_model(
        name, pretrained=False, num_classes=0, in_chans=in_chans, zero_init_last=zero_init
    )
    if small_stem:
        # CIFAR-style stem (SimCLR appendix B.9): 3x3 stride-1 conv, no max-pool.
        width = int(model.get_submodule("conv1").out_channels)  # type: ignore[arg-type]
        model.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        _init_conv(model.conv1)
        model.maxpool = nn.Identity()
    return model


def build_encoder(
    cfg: ModelConfig,
    in_chans: int,
    image_size: int = 32,
    zero_init_residual: bool | None = None,
    any_size: bool = False,
) -> nn.Module:
    """Build the backbone named by ``cfg.encoder``.

    Args:
        cfg: Model config (``encoder``, ``widths``, ``small_stem``).
        in_chans: Input channels (1 or 3).
        image_size: Side of the square input; ViTs are built for exactly this size.
        zero_init_residual: Zero the last BN gamma of each residual branch (ResNets only);
            default ``cfg.zero_init_residual``.
        any_size: ViTs also take other multiples of the patch (timm's ``dynamic_img_size``: the
            position embedding is interpolated; the same weights and the same output at
            `image_size`). For multi-crop methods; ResNets take any size anyway.

    Returns:
        A module mapping ``[B, in_chans, image_size, image_size]`` to ``[B, num_features]``,
        with an int attribute ``num_features``.
    """
    if zero_init_residual is None:
        zero_init_residual = cfg.zero_init_residual
    if cfg.encoder == "thin_resnet":
        return ThinResNet(cfg.widths, cfg.depths, in_chans, cfg.small_stem, zero_init_residual)
    name = _TIMM_NAMES[cfg.encoder]
    if cfg.encoder.startswith("resnet"):
        return _timm_resnet(name, in_chans, cfg.small_stem, zero_init_residual)
    patch = SMALL_PATCH if cfg.small_stem else 16
    if image_size % patch:
        raise ValueError(
            f"{cfg.encoder}: image_size {image_size} is not a multiple of patch {patch}"
        )
    shape: dict[str, Any] = {} if cfg.vit_heads is None else {"num_heads": cfg.vit_heads}
    if cfg.vit_depth is not None:
        shape["depth"] = cfg.vit_depth
    model: nn.Module = timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        in_chans=in_chans,
        img_size=image_size,
        patch_size=patch,
        dynamic_img_size=any_size,
        **shape,
    )
    return model


def maybe_sync_bn(module: nn.Module, enabled: bool) -> nn.Module:
    """Convert every BatchNorm to SyncBatchNorm when ``enabled``.

    Raises:
        ValueError: if enabled without CUDA; torch's SyncBatchNorm refuses CPU tensors at forward
            time, which would otherwise surface deep inside the first training step.
    """
    if not enabled:
        return module
    if not torch.cuda.is_available():
        raise ValueError("model.sync_bn=true needs CUDA GPUs; SyncBatchNorm does not run on CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
