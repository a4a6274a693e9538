"""What the masked image modelling methods (:mod:`~ssl_dist.methods.mae`,
:mod:`~ssl_dist.methods.simmim`) share: one augmented view with its masking noise, random
masking by sorting that noise, patchify, and the pixel loss on masked patches.

Masking follows facebookresearch/mae ``models_mae.py`` (``random_masking``): per image, uniform
noise over the L patches is sorted and the first ``int(L * (1 - mask_ratio))`` patches are kept,
so every image keeps the same number of patches. The noise is drawn by the inputs builder from
the step's seed (a generator of its own, not the global RNG), so the mask is reproducible and a
forward pass is a pure function of its inputs.

The view is MAE's (He et al. 2021, sec. A.1): random resized crop (``views.crop_scale``) and
horizontal flip, no colour augmentation, then per-channel normalisation. The crop is the first
of the two crops the loader cuts from the full-resolution image when the stream cuts them
(``crop_scale`` exposed here): the loader cuts a second crop that is not used (one more
resize and a few KB per image), but the image is decoded once and the crop keeps the full
resolution; without loader crops the view would be cropped from the evaluation view, a centred,
already down-sized square. Batches without crops (evaluation streams) are cropped here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_dist.config import Config
from ssl_dist.data.shards import Manifest
from ssl_dist.data.views import TwoViews, views_for
from ssl_dist.precision import full_precision

MASK_SEED_OFFSET = 0x5EED
"""Added to the step's seed for the masking noise, so that its stream is not the one the
augmentation draws its crops from (which is seeded with the step's seed itself)."""


def mim_views(cfg: Config, manifest: Manifest) -> TwoViews:
    """The run's views without colour steps: crop, flip, normalise (MAE's recipe)."""
    plain = cfg.views.model_copy(
        update={"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": (0.0, 0.0), "solarize_p": (0.0, 0.0)}
    )
    return views_for(cfg.model_copy(update={"views": plain}), manifest)


class MaskedInputs:
    """``(x, noise)``: one augmented view per image ``[N, C, H, W]`` and uniform masking noise
    ``[N, L]`` (L patches per image), both on `device` and fixed by the seed.

    Args:
        views: The augmentation (:func:`mim_views`), moved to `device`.
        num_patches: L, the patches the method masks.
        device: Where the inputs are made.
    """

    def __init__(self, views: TwoViews, num_patches: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.views = views.to(self.device)
        self.num_patches = num_patches
        self.crop_scale: tuple[float, float] | None = views.crop_scale
        """The training stream cuts the crops in the loader (the first one is used)."""

    def noise(self, n: int, seed: int) -> Tensor:
        """Masking noise ``[n, L]``, drawn on the CPU (the same on every device)."""
        gen = torch.Generator().manual_seed((seed + MASK_SEED_OFFSET) % 2**63)
        return torch.rand(n, self.num_patches, generator=gen).to(self.device)

    def __call__(self, batch, seed: int) -> tuple[Tensor, Tensor]:
        crops = getattr(batch, "crops", None)
        if crops is not None:  # cut by the loader; only the first crop is augmented
            x = self.views.single_from_crops(crops[:, 0].to(self.device, non_blocking=True), seed)
        else:
            x = self.views.single(batch.eval_images().to(self.device, non_blocking=True), seed)
        return x, self.noise(x.shape[0], seed)


def keep_count(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per image, ``int(L * (1 - mask_ratio))`` as in the reference, at least 1."""
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(noise: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the `keep` patches of lowest noise per image.

    Args:
        noise: ``[N, L]``. keep: patches kept per image (``1 <= keep < L``).

    Returns:
        ``ids_keep`` ``[N, keep]`` (kept patch indices, in noise order), ``ids_restore``
        ``[N, L]`` (position of each patch in the shuffled order) and ``mask`` ``[N, L]``
        (1.0 masked, 0.0 kept), as in ``models_mae.random_masking``.
    """
    n, length = noise.shape
    if not 1 <= keep < length:
        raise ValueError(f"keep must lie in [1, {length - 1}], got {keep}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


def patchify(x: Tensor, patch: int) -> Tensor:
    """``[N, C, H, W] -> [N, L, patch * patch * C]``, patches in row-major order, each patch's
    pixels as ``(row, col, channel)`` (``models_mae.patchify``)."""
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of patch {patch}")
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch) * (w // patch), -1)


def masked_pixel_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool) -> Tensor:
    """Mean squared error over the masked patches only (``models_mae.forward_loss``).

    Computed in float32 (float64 stays float64) with autocast off. Every image masks the same
    number of patches, so the mean over this rank's masked patches is the mean of per-image
    terms, and averaging gradients over ranks gives the gradient of the global batch.

    Args:
        pred: Predicted patches ``[N, L, P]``.
        target: Patchified image ``[N, L, P]`` (no gradient needed).
        mask: ``[N, L]``, 1 for masked patches.
        norm_pix: Normalise each target patch by its own mean and variance (eps 1e-6).

    Returns: scalar.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)}"
        )
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    with full_precision(pred.device.type):
        pred, target, mask = pred.to(dtype), target.detach().to(dtype), mask.to(dtype)
        if norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = (pred - target).pow(2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum()
