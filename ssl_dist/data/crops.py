"""Decoding a sample once into the square views the model sees, cut from the full-resolution
image: the evaluation view (short side resized to the output side, centre crop: aspect kept) and
the random-resized crops of the two training views (SimCLR / MoCo's crop: area a uniform share
of the image in ``scale``, aspect ratio log-uniform in 3/4..4/3, position uniform).

Crop boxes are in pixels of the stored image, as floats (``(left, top, right, bottom)``):
PIL resamples the box straight to the output side (antialiased bilinear), so a small image's
crop is not first rounded to whole pixels. A JPEG whose every box is at least twice the output
side is decoded at 1/2, 1/4 or 1/8 of its size (PIL ``draft``: the DCT's reduced-size decode),
which keeps large images cheap; the boxes are scaled to the reduced image.

The crops of a sample depend only on a generator seeded from (run seed, epoch, sample key)
(:func:`sample_rng`), so a resumed epoch cuts the same crops, whichever worker reads the sample.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

Box = tuple[float, float, float, float]
"""``(left, top, right, bottom)`` in pixels of the stored image."""

RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range (width / height) of a random-resized crop (SimCLR, torchvision)."""

RESAMPLE = Image.Resampling.BILINEAR
"""Antialiased bilinear, torchvision's ``RandomResizedCrop`` default (MoCo, BYOL use it; SimCLR's
and DINO's reference code resize bicubic). Bicubic made a sample's two crops 25% slower here
(decode + resize of the generated JPEG folder at 64 px)."""


@dataclass(frozen=True)
class CropPlan:
    """What the loader cuts from each training sample: the two global random-resized crops at
    the views' side (area share in `scale`) and, for multi-crop methods (DINO), `local_count`
    more at `local_size` px (area share in `local_scale`), all from one decode. Passed where a
    bare ``crop_scale`` goes (``stream(..., crop_scale=plan)``)."""

    scale: tuple[float, float]
    local_count: int = 0
    local_size: int = 0
    local_scale: tuple[float, float] = (0.05, 0.4)


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one sample's crops in one epoch."""
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, digest])


def centre_box(width: int, height: int) -> Box:
    """The centred square of the short side: short-side resize + centre crop, aspect kept."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def random_resized_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
) -> Box:
    """torchvision's ``RandomResizedCrop.get_params`` in float pixels: up to 10 draws of area
    share and log aspect ratio until the box fits, then a uniform position; else the whole
    image clamped to the ratio range, centred."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    w, h = float(width), float(height)
    if w / h < ratio[0]:
        h = w / ratio[0]
    elif w / h > ratio[1]:
        w = h * ratio[1]
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


def open_image(payload: bytes) -> Image.Image:
    """The encoded image, not decoded yet (its size is known)."""
    return Image.open(io.BytesIO(payload))


def decode_boxes(
    raw: Image.Image, boxes: list[Box], size: int | Sequence[int], channels: int
) -> tuple[list[torch.Tensor], int]:
    """Decode `raw` once and resample each box to ``size x size`` (`size`: one side for every
    box, or one per box).

    Returns:
        uint8 ``[C, size, size]`` per box, and the reduction the JPEG was decoded at (1: full
        size; 2, 4 or 8 with ``draft``).
    """
    width, height = raw.size
    sizes = [size] * len(boxes) if isinstance(size, int) else list(size)
    shrink = min(min(b[2] - b[0], b[3] - b[1]) / s for b, s in zip(boxes, sizes, strict=True))
    if shrink >= 2 and raw.format == "JPEG":
        raw.draft(None, (math.ceil(width / shrink), math.ceil(height / shrink)))
    reduced = raw.size[0]
    im = raw.convert("L" if channels == 1 else "RGB")
    sx, sy = im.size[0] / width, im.size[1] / height
    out = []
    for (left, top, right, bottom), side in zip(boxes, sizes, strict=True):
        box = (left * sx, top * sy, right * sx, bottom * sy)
        view = im.resize((side, side), RESAMPLE, box=box)
        arr = np.asarray(view)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
    return out, round(width / reduced)


def decode_views(payload: bytes, size: int, channels: int) -> torch.Tensor:
    """The evaluation view of an encoded image: uint8 ``[C, size, size]``."""
    with open_image(payload) as raw:
        return decode_boxes(raw, [centre_box(*raw.size)], size, channels)[0][0]


def decode_crops(
    payload: bytes,
    size: int,
    channels: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
) -> torch.Tensor:
    """The two training views' random-resized crops of an encoded image, from one decode:
    uint8 ``[2, C, size, size]``."""
    with open_image(payload) as raw:
        boxes = [random_resized_box(rng, *raw.size, scale) for _ in range(2)]
        return torch.stack(decode_boxes(raw, boxes, size, channels)[0])


def decode_multi_crops(
    payload: bytes, size: int, channels: int, rng: np.random.Generator, plan: CropPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two global crops (uint8 ``[2, C, size, size]``) and the plan's local crops (uint8
    ``[M, C, local_size, local_size]``) of an encoded image, from one decode. The global boxes
    are drawn first, so they are those :func:`decode_crops` draws from the same generator (a
    JPEG may be decoded at a smaller reduction when a local box asks for more pixels)."""
    with open_image(payload) as raw:
        boxes = [random_resized_box(rng, *raw.size, plan.scale) for _ in range(2)]
        boxes += [
            random_resized_box(rng, *raw.size, plan.local_scale) for _ in range(plan.local_count)
        ]
        sizes = [size] * 2 + [plan.local_size] * plan.local_count
        crops = decode_boxes(raw, boxes, sizes, channels)[0]
        return torch.stack(crops[:2]), torch.stack(crops[2:])
