"""Multi-crop inputs (Caron et al. 2020, SwAV sec. 3.2; DINO's ``DataAugmentationDINO`` in
facebookresearch/dino ``main_dino.py``): two global views at the run's image side plus M local
views at a smaller side, all of the same images.

The loader cuts every crop from one decode of the full-resolution image
(``stream(..., crop_scale=inputs.crop_scale)`` with a :class:`~ssl_dist.data.crops.CropPlan`):
the batch then carries ``crops [B, 2, C, H, W]`` and ``local_crops [B, M, C, h, w]``, and the
remaining steps (flip, colour, grey, blur, solarize, normalise) run batched on the device, one
pass per size. A batch with the evaluation views only (in-memory tests, tools) gets its crops
cut here instead, with kornia, from the centred square.

Global views follow the run's two-view recipe (``views``: view 1 and view 2 keep their own blur
and solarization probabilities, as DINO's ``global_transfo1`` / ``global_transfo2``); local
views use view 1's colour steps with the local blur probability and no solarization (DINO's
``local_transfo``: blur p = 0.5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_dist.config import Config
from ssl_dist.data.crops import CropPlan
from ssl_dist.data.shards import Manifest
from ssl_dist.data.views import TwoViews, views_for

LOCAL_SEED_MASK = 0x5EED_10CA_1000
"""XORed into a step's augmentation seed for the local views, so that their draws are not the
first view's."""


def local_views_for(
    cfg: Config, manifest: Manifest, size: int, scale: tuple[float, float], blur_p: float
) -> TwoViews:
    """The local views' augmentation: the run's recipe at `size` px, crops of area share in
    `scale`, blur with probability `blur_p` and no solarization (only its first view is used)."""
    views = cfg.views.model_copy(
        update={"crop_scale": scale, "blur_p": (blur_p, blur_p), "solarize_p": (0.0, 0.0)}
    )
    data = cfg.data.model_copy(update={"image_size": size})
    return views_for(cfg.model_copy(update={"views": views, "data": data}), manifest)


class MultiCropInputs:
    """``(x1, x2)`` or, with local crops, ``(x1, x2, local)`` of a decoded batch on `device`:
    the global views ``[B, C, H, W]`` each and the local views ``[B, M, C, h, w]``.

    Args:
        views: The global views' augmentation (the run's two-view recipe).
        local: The local views' augmentation (:func:`local_views_for`), at ``h = w`` px.
        local_count: M local views per image (0: the two global views only).
        device: Where the views are made and the model runs.
    """

    def __init__(
        self, views: TwoViews, local: TwoViews, local_count: int, device: torch.device | str
    ) -> None:
        if local_count < 0:
            raise ValueError(f"local_count must be >= 0, got {local_count}")
        self.device = torch.device(device)
        self.views = views.to(self.device)
        self.local = local.to(self.device)
        self.local_count = local_count
        plan = CropPlan(views.crop_scale, local_count, local.image_size, local.crop_scale)
        self.crop_scale: tuple[float, float] | CropPlan = plan if local_count else plan.scale
        """What the training stream cuts in the loader (``stream(..., crop_scale=...)``)."""

    def __call__(self, batch, seed: int) -> tuple[Tensor, ...]:
        m, local_seed = self.local_count, seed ^ LOCAL_SEED_MASK
        crops = getattr(batch, "crops", None)
        if crops is not None:  # cut by the loader from the full-resolution images
            x1, x2 = self.views.from_crops(crops.to(self.device, non_blocking=True), seed=seed)
            if m == 0:
                return x1, x2
            cut = getattr(batch, "local_crops", None)
            if cut is None or cut.shape[1] != m:
                got = None if cut is None else tuple(cut.shape)
                raise ValueError(f"the batch carries local crops {got}, the method wants {m}")
            flat = cut.to(self.device, non_blocking=True).flatten(0, 1)  # [B * M, C, h, w]
            local = self.local.single_from_crops(flat, seed=local_seed)
        else:
            images = batch.eval_images().to(self.device, non_blocking=True)
            x1, x2 = self.views(images, seed=seed)
            if m == 0:
                return x1, x2
            # Each of the M copies of an image draws its own crop and colour parameters.
            local = self.local.single(images.repeat_interleave(m, dim=0), seed=local_seed)
        return x1, x2, local.unflatten(0, (x1.shape[0], m))
