"""Self-supervised methods behind one task seam: SimCLR, MoCo v2, MoCo v3, BYOL (two views) and
rotation prediction (four rotations of one view), MAE and SimMIM (masked patches of one view),
DINO (self-distillation on multi-crop views).

``build_method(cfg.method, cfg.model, in_chans, image_size)`` returns an :class:`SSLMethod`
that builds its own inputs (``make_inputs``) and whose ``forward(*inputs)`` gives
``(loss, metrics)``; see :mod:`ssl_dist.methods.base` for the contract. A new method is a file
here, its line in :data:`METHODS` and its name in ``MethodConfig.name``.
"""

from __future__ import annotations

from ssl_dist.config import MethodConfig, ModelConfig
from ssl_dist.methods.base import SSLMethod, alignment, pair_metrics, uniformity
from ssl_dist.methods.byol import BYOL
from ssl_dist.methods.dino import DINO
from ssl_dist.methods.mae import MAE
from ssl_dist.methods.moco import MoCoV2, MoCoV3
from ssl_dist.methods.rotation import Rotation
from ssl_dist.methods.simclr import SimCLR
from ssl_dist.methods.simmim import SimMIM
from ssl_dist.models import maybe_sync_bn

METHODS: dict[str, type[SSLMethod]] = {
    cls.name: cls for cls in (SimCLR, MoCoV2, MoCoV3, BYOL, Rotation, MAE, SimMIM, DINO)
}
"""Method classes keyed by ``MethodConfig.name``."""


def build_method(
    method_cfg: MethodConfig, model_cfg: ModelConfig, in_chans: int, image_size: int
) -> SSLMethod:
    """Build the method named by ``method_cfg.name``.

    BatchNorm layers (online and momentum networks alike) become SyncBatchNorm when
    ``model_cfg.sync_bn`` (GPU only; see :func:`ssl_dist.models.maybe_sync_bn`).

    Args:
        method_cfg: Method config.
        model_cfg: Model config.
        in_chans: Input channels (1 or 3).
        image_size: Side of the square input images.

    Raises:
        ValueError: for an unknown method name, or ``sync_bn`` without CUDA.
    """
    cls = METHODS.get(method_cfg.name)
    if cls is None:
        raise ValueError(f"unknown method {method_cfg.name!r}; use one of {sorted(METHODS)}")
    method = cls(method_cfg, model_cfg, in_chans, image_size)
    converted = maybe_sync_bn(method, model_cfg.sync_bn)
    # convert_sync_batchnorm replaces BN children in place and returns the root module itself.
    assert converted is method
    return method


__all__ = [
    "BYOL",
    "DINO",
    "MAE",
    "METHODS",
    "MoCoV2",
    "MoCoV3",
    "Rotation",
    "SSLMethod",
    "SimCLR",
    "SimMIM",
    "alignment",
    "build_method",
    "pair_metrics",
    "uniformity",
]
