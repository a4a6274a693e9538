"""Encoders, projection heads and momentum encoders."""

from ssl_dist.models.ema import cosine_momentum, ema_update, make_momentum_copy
from ssl_dist.models.encoders import THIN_LAYERS, ThinResNet, build_encoder, maybe_sync_bn
from ssl_dist.models.heads import Predictor, Projector, build_predictor, build_projector

__all__ = [
    "THIN_LAYERS",
    "Predictor",
    "Projector",
    "ThinResNet",
    "build_encoder",
    "build_predictor",
    "build_projector",
    "cosine_momentum",
    "ema_update",
    "make_momentum_copy",
    "maybe_sync_bn",
]
