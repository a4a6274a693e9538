"""Config sections of the methods with settings of their own (``method.masked``,
``method.dino``); :class:`ssl_dist.config.MethodConfig` holds them."""

from __future__ import annotations

from pydantic import Field, field_validator

from ssl_dist.config.base import _Strict


class MaskedConfig(_Strict):
    """Masked image modelling (`mae`, `simmim`): the mask and the pixel decoder."""

    mask_ratio: float = Field(0.75, gt=0, lt=1)
    """Share of patches masked per image (MAE: 0.75; SimMIM: 0.6)."""
    norm_pix_loss: bool = True
    """Regress each patch's pixels normalised by their own mean and std (MAE's norm_pix_loss)."""
    decoder_dim: int = Field(128, ge=8)
    """MAE: width of the transformer decoder (the paper's is 512)."""
    decoder_depth: int = Field(2, ge=1)
    """MAE: transformer blocks of the decoder (the paper's is 8)."""
    decoder_heads: int = Field(4, ge=1)
    """MAE: attention heads of the decoder blocks; must divide `decoder_dim` (the paper: 16)."""
    fixed_pos_embed: bool = True
    """MAE: the encoder's position embedding is the fixed 2-D sin-cos one, not trained (the
    reference's); False keeps timm's learned embedding (random at init)."""
    mask_patch: int = Field(4, ge=1)
    """SimMIM: side in pixels of the masked squares; must divide the image side."""


class DinoConfig(_Strict):
    """DINO (`dino`): head, temperatures, centring and multi-crop (``method.dino.out_dim``)."""

    out_dim: int = Field(65536, ge=2)
    """K: width of the head's weight-normalised last layer (the reference's 65536)."""
    hidden_dim: int = Field(2048, ge=8)
    """Hidden width of the head's 3-layer MLP."""
    bottleneck_dim: int = Field(256, ge=2)
    """Width of the L2-normalised bottleneck before the last layer."""
    norm_last_layer: bool = True
    """Fix the last layer's weight norm at 1 (the reference's default; False learns it)."""
    student_temp: float = Field(0.1, gt=0)
    """Temperature of the student softmax."""
    teacher_temp: float = Field(0.04, gt=0)
    """Temperature of the teacher softmax after the warm-up (the reference: 0.04 to 0.07)."""
    warmup_teacher_temp: float = Field(0.04, gt=0)
    """Teacher temperature at step 0, raised linearly to `teacher_temp`."""
    teacher_temp_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of the teacher temperature's linear warm-up (the reference counts 30
    epochs: 30 x steps per epoch)."""
    center_momentum: float = Field(0.9, ge=0, lt=1)
    """EMA momentum of the centre of the teacher outputs."""
    local_crops: int = Field(0, ge=0)
    """M small crops per image besides the 2 global ones (the reference: 10; 0: no multi-crop)."""
    local_size: int = Field(96, ge=4)
    """Side of the local crops in pixels (the reference: 96 with 224 px global crops)."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of the local crops as a fraction of the image (global: `views.crop_scale`)."""
    local_blur_p: float = Field(0.5, ge=0, le=1)
    """Gaussian blur probability of the local crops (the reference: 0.5, no solarization)."""

    @field_validator("local_scale")
    @classmethod
    def _local_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("must be two numbers with 0 < min <= max <= 1")
        return v
