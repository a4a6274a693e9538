"""Two augmented views of a batch, on the batch's device (kornia, per-sample parameters).

The loader can cut the random-resized crops itself, from the full-resolution image
(``stream(..., crop_scale=views.crop_scale)``, :mod:`ssl_dist.data.crops`); the batch then
carries them (``Batch.crops``) and :meth:`TwoViews.from_crops` applies the remaining steps.
Without them the crop is taken here from the loader's evaluation view (the centred square).

The recipe is SimCLR's (Chen et al. 2020, appendix A) with the per-view blur / solarization
probabilities of BYOL / MoCo v3 (``moco-v3/main_moco.py``: ``augmentation1`` and
``augmentation2``), in MoCo v3's order: random resized crop, horizontal flip, colour jitter
(brightness, contrast, saturation ``0.8 s``, hue ``0.2 s``) with probability ``jitter_p``, random
grayscale, Gaussian blur (sigma in [0.1, 2.0], kernel about 10% of the image side, odd), and
solarization at threshold 0.5; then per-channel normalisation.

Grey input (C = 1): saturation and hue are meaningless on one channel and grayscale is the
identity, so the grey pipeline jitters only brightness and contrast and skips grayscale. Its
outputs have the same distribution as repeating the channel to RGB and running the full pipeline
(saturation and hue leave an R = G = B image unchanged), at a third of the cost. The result is
repeated to 3 channels when ``channels == 3``; colour input with ``channels == 1`` is converted
to grey (ITU-R 601 luma) after the colour steps.

``kornia.augmentation.ColorJitter`` is used, not ``ColorJiggle``: ColorJitter follows
torchvision's formulas (brightness multiplies, contrast / saturation blend with the grey mean /
grey image), which is what the SimCLR strength ``s`` was tuned for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import kornia.augmentation as K
import torch
import torchvision.transforms.v2 as T
from kornia.color import rgb_to_grayscale
from torch import nn

from ssl_dist.config import Config, ViewsConfig
from ssl_dist.data.shards import Manifest

BLUR_SIGMA = (0.1, 2.0)


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel side of about 10% of the image (SimCLR: 23 px at 224 px), at least 3."""
    k = int(0.1 * image_size)
    return max(3, k if k % 2 else k + 1)


def _pipeline(
    cfg: ViewsConfig, image_size: int, colour: bool, blur_p: float, solarize_p: float
) -> nn.Sequential:
    s = cfg.jitter_strength
    augs: list[nn.Module] = [
        # "resample" crops and resizes the whole batch in one warp; "slice" loops over samples.
        K.RandomResizedCrop(
            (image_size, image_size), scale=cfg.crop_scale, cropping_mode="resample"
        ),
        K.RandomHorizontalFlip(p=cfg.flip_p),
    ]
    if cfg.jitter_p > 0:
        sat, hue = (0.8 * s, 0.2 * s) if colour else (0.0, 0.0)
        augs.append(K.ColorJitter(0.8 * s, 0.8 * s, sat, hue, p=cfg.jitter_p))
    if colour and cfg.grayscale_p > 0:
        augs.append(K.RandomGrayscale(p=cfg.grayscale_p))
    if blur_p > 0:
        k = blur_kernel_size(image_size)
        augs.append(K.RandomGaussianBlur((k, k), BLUR_SIGMA, p=blur_p))
    if solarize_p > 0:
        # A fixed threshold of 0.5 and no addition: a scalar would be a range around 0.5.
        augs.append(K.RandomSolarize(thresholds=(0.5, 0.5), additions=(0.0, 0.0), p=solarize_p))
    return nn.Sequential(*augs)


def _stats(values: Sequence[float] | None, channels: int, name: str) -> torch.Tensor:
    if values is None:
        raise ValueError(f"views.normalize is on but no {name} was given")
    t = torch.as_tensor(list(values), dtype=torch.float32)
    if t.numel() not in (1, channels):
        raise ValueError(f"{name} needs 1 or {channels} values, got {t.numel()}")
    return t.expand(channels).reshape(1, channels, 1, 1).clone()


class TwoViews(nn.Module):
    """Produce two independently augmented, normalised views of a uint8 batch.

    Args:
        cfg: Augmentation recipe.
        image_size: Output side.
        channels: Output channels (1 or 3).
        mean: Per-channel mean in [0, 1] units of the output channels (or one value for all);
            unused when ``cfg.normalize`` is False.
        std: Per-channel standard deviation, as ``mean``.
    """

    mean: torch.Tensor | None
    std: torch.Tensor | None

    def __init__(
        self,
        cfg: ViewsConfig,
        image_size: int,
        channels: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.image_size = image_size
        self.channels = channels
        self.crop_scale = cfg.crop_scale
        self.normalize = cfg.normalize
        args = [(cfg.blur_p[i], cfg.solarize_p[i]) for i in range(2)]
        self.colour = nn.ModuleList(_pipeline(cfg, image_size, True, *a) for a in args)
        self.grey = nn.ModuleList(_pipeline(cfg, image_size, False, *a) for a in args)
        norm = cfg.normalize
        # Buffers, so that .to(device) moves them; not persistent: they are not model state.
        self.register_buffer("mean", _stats(mean, channels, "mean") if norm else None, False)
        self.register_buffer("std", _stats(std, channels, "std") if norm else None, False)

    def _finish(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[1] == 3 and self.channels == 1:
            v = rgb_to_grayscale(v)
        elif v.shape[1] == 1 and self.channels == 3:
            v = v.repeat(1, 3, 1, 1)
        if self.mean is not None and self.std is not None:
            v = (v - self.mean) / self.std
        return v.contiguous()

    def _views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pipes = self.colour if x.shape[1] == 3 else self.grey
        return self._finish(pipes[0](x)), self._finish(pipes[1](x))

    def forward(
        self, batch: torch.Tensor, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch twice.

        Args:
            batch: uint8 ``[B, C, H, W]`` with C = 1 or 3, on any device.
            seed: When given, the views depend only on the batch and the seed (on CPU; CUDA
                kernels may differ across GPUs); the global RNG state is left unchanged.

        Returns:
            ``(x1, x2)``: float32 ``[B, channels, image_size, image_size]`` each.
        """
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(
                f"expected a uint8 [B, 1|3, H, W] batch, got {batch.dtype} {tuple(batch.shape)}"
            )
        x = batch.float().div_(255.0)
        with _seeded(x.device, seed):
            return self._views(x)

    def from_crops(
        self, crops: torch.Tensor, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of crops the loader already cut and resized (``Batch.crops``): every
        step but the random-resized crop, batched on the crops' device.

        Args:
            crops: uint8 ``[B, 2, C, image_size, image_size]`` (view 1, view 2 per sample).
            seed: As in :meth:`forward`.
        """
        size = self.image_size
        if crops.dtype != torch.uint8 or crops.ndim != 5 or crops.shape[1] != 2:
            raise ValueError(f"expected uint8 [B, 2, C, H, W] crops, got {tuple(crops.shape)}")
        if crops.shape[-2:] != (size, size):
            raise ValueError(f"crops are {tuple(crops.shape[-2:])}, the views {size} px")
        x = crops.float().div_(255.0)
        pipes = self.colour if x.shape[2] == 3 else self.grey
        with _seeded(x.device, seed):
            v1, v2 = (self._finish(_after_crop(pipes[i])(x[:, i])) for i in range(2))
        return v1, v2

    def single_from_crops(self, crops: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """One view (the first view's recipe) of crops the loader already cut and resized, as
        :meth:`from_crops` does for two: every step but the random-resized crop. Of
        ``from_crops(crops)`` it equals the first view (the same draws from the same seed).

        Args: crops: uint8 ``[B, C, image_size, image_size]``; seed: as in :meth:`forward`.
        """
        size = self.image_size
        if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[-2:] != (size, size):
            raise ValueError(f"expected uint8 [B, C, {size}, {size}] crops, got {crops.shape}")
        x = crops.float().div_(255.0)
        pipe = (self.colour if x.shape[1] == 3 else self.grey)[0]
        with _seeded(x.device, seed):
            return self._finish(_after_crop(pipe)(x))

    def single(self, batch: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """One augmented view (the first view's recipe) of a uint8 batch, for tasks that need
        one: as :meth:`forward`, returns float32 ``[B, channels, image_size, image_size]``."""
        x = batch.float().div_(255.0)
        pipes = self.colour if x.shape[1] == 3 else self.grey
        with _seeded(x.device, seed):
            return self._finish(pipes[0](x))

    @torch.no_grad()
    def plain(self, batch: torch.Tensor) -> torch.Tensor:
        """The un-augmented view for evaluation: resize, channel conversion and normalisation.

        Args:
            batch: uint8 ``[B, C, H, W]``. Returns: float32 ``[B, channels, size, size]``.
        """
        x = batch.float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            )
        return self._finish(x)


def _after_crop(pipe: nn.Module) -> nn.Sequential:
    """A view's steps after its random-resized crop (the crop is the pipeline's first step)."""
    return nn.Sequential(*list(pipe.children())[1:])


@contextmanager
def _seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """kornia samples from torch's global RNG: with a seed, fork it so the call has no side
    effects and depends only on the batch and the seed."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def views_for(cfg: Config, manifest: Manifest) -> TwoViews:
    """The run's two-view augmentation, normalised with the manifest's train mean / std."""
    mean, std = manifest.mean, manifest.std
    if len(mean) != cfg.data.channels:
        # Grey data fed as 3 channels (or the reverse): one shared statistic serves every channel.
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return TwoViews(cfg.views, cfg.data.image_size, cfg.data.channels, mean, std)


class TwoViewInputs:
    """The inputs of a two-view method: ``(x1, x2)`` of a decoded batch, on `device`.

    A batch with loader crops (``Batch.crops``) gets the remaining steps only
    (:meth:`TwoViews.from_crops`); else the whole recipe runs on ``batch.images``.

    Args:
        views: The augmentation (moved to `device` here).
        device: Where the views are made and the model runs.
    """

    def __init__(self, views: TwoViews, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.views = views.to(self.device)
        self.crop_scale: tuple[float, float] | None = views.crop_scale
        """What the training stream should cut in the loader
        (``stream(..., crop_scale=inputs.crop_scale)``); inputs without the attribute, or with
        None, take no loader crops."""

    def __call__(self, batch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        crops = getattr(batch, "crops", None)
        if crops is not None:  # cut by the loader from the full-resolution images
            return self.views.from_crops(crops.to(self.device, non_blocking=True), seed=seed)
        return self.views(batch.eval_images().to(self.device, non_blocking=True), seed=seed)


def per_sample_torchvision_views(
    batch: torch.Tensor,
    cfg: ViewsConfig,
    image_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the same recipe with torchvision v2, one image at a time (benchmarks only).

    Grey input is repeated to RGB first (equivalent, see the module docstring).

    Args:
        batch: uint8 ``[B, C, H, W]`` on CPU.

    Returns:
        ``(x1, x2)``: float32 ``[B, channels, image_size, image_size]`` each.
    """
    s, k = cfg.jitter_strength, blur_kernel_size(image_size)

    def view(i: int) -> T.Compose:
        return T.Compose(
            [
                T.ToDtype(torch.float32, scale=True),
                T.RandomResizedCrop(image_size, scale=cfg.crop_scale, antialias=True),
                T.RandomHorizontalFlip(cfg.flip_p),
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cfg.jitter_p),
                T.RandomGrayscale(cfg.grayscale_p),
                T.RandomApply([T.GaussianBlur(k, BLUR_SIGMA)], p=cfg.blur_p[i]),
                T.RandomSolarize(0.5, p=cfg.solarize_p[i]),
                T.Grayscale(1) if channels == 1 else T.Identity(),
                T.Normalize(list(mean), list(std)) if cfg.normalize else T.Identity(),
            ]
        )

    rgb = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
    pipes = view(0), view(1)
    return tuple(torch.stack([p(img) for img in rgb]) for p in pipes)  # type: ignore[return-value]
