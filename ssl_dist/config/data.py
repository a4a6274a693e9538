"""Config sections of the input side: the shard stream (``data``, with its damage policy) and
the views (``views``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ssl_dist.config.base import _Strict


class DamagePolicy(_Strict):
    """What the stream does with damaged data (``data.on_damage``)."""

    shard: Literal["fail", "skip"] = "fail"
    """A shard that is missing, whose size (or sha256, with `data.verify_checksums`) differs from
    the manifest, or that cannot be read to its end. `fail`: stop with an error naming the shard
    (before the epoch's first step when the check before the epoch finds it); `skip`: read what
    can be read, count the samples lost (manifest count minus samples read) and go on."""
    sample: Literal["fail", "skip"] = "skip"
    """A single sample that does not decode (no image or class, a corrupt image). `skip`: drop
    and count it; `fail`: stop with an error naming the sample and its shard."""


class DataConfig(_Strict):
    manifest: str = "work/data/digits/manifest.json"
    """Path or URL (file://, http(s)://, s3://) of the manifest.json written by `data prepare`."""
    shards: list[str] | None = None
    """Explicit shard URLs (e.g. a mirror); must name the manifest's shards in its order."""
    split: str = "train"
    """Which split of the manifest to stream for training."""
    val_split: str = "val"
    """Split with labels used for kNN monitoring and linear evaluation."""
    batch_size: int = Field(64, ge=1)
    """Images per rank per step; the global batch is batch_size x world size x grad_accum."""
    image_size: int = Field(32, ge=8, le=1024)
    """Side of the square images fed to the encoder: the evaluation view is the short side
    resized to it and centre-cropped (aspect kept); training crops are cut from the
    full-resolution image and resized to it."""
    channels: Literal[1, 3] = 3
    """Channels fed to the encoder: grey images are repeated to 3, colour images averaged to 1."""
    mode: Literal["exact", "resampled"] = "exact"
    """`exact`: each sample read once per epoch by one (rank, worker); `resampled`: shards drawn
    with replacement, fixed steps per epoch, for fewer shards than ranks x workers."""
    steps_per_epoch: int | None = Field(None, ge=1)
    """Resampled mode only: batches per rank per epoch (default: dataset size / global batch)."""
    loader_workers: int = Field(0, ge=0, le=64)
    """DataLoader worker processes per rank (0 reads in the training process)."""
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    """How loader workers start. Fork is not offered: a forked worker inside a Ray worker that
    already holds threads can deadlock in CPython's after-fork code."""
    first_batch_timeout_s: float = Field(120.0, gt=0)
    """Fail with a clear error if no batch arrives within this many seconds."""
    shuffle_buffer: int = Field(256, ge=0)
    """Samples held for in-shard shuffling (0 keeps shard order)."""
    allow_unsafe: bool = False
    """Allow `pipe:` shard URLs and pickle decoders. Only for shards you wrote yourself."""
    verify_checksums: bool = False
    """Before an epoch each rank compares its shards' sizes with the manifest (a stat or a HEAD
    request); with this on it also compares their sha256, reading each shard once more (once
    per worker process: a shard whose checksum matched is not hashed again)."""
    on_damage: DamagePolicy = DamagePolicy()
    """Policy for damaged data, `{shard: fail|skip, sample: fail|skip}` (default: fail on a
    missing, truncated or mismatching shard, skip single undecodable samples)."""

    @field_validator("on_damage", mode="before")
    @classmethod
    def _damage_policy(cls, v: Any) -> Any:
        if not isinstance(v, dict | DamagePolicy):
            raise ValueError(
                "must be a mapping {shard: fail|skip, sample: fail|skip}; set one part, "
                "e.g. data.on_damage.shard=skip"
            )
        return v


class ViewsConfig(_Strict):
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Area range of the random resized crop, as a fraction of the image."""
    flip_p: float = Field(0.5, ge=0, le=1)
    """Probability of a horizontal flip."""
    jitter_p: float = Field(0.8, ge=0, le=1)
    """Probability of colour jitter."""
    jitter_strength: float = Field(0.5, ge=0, le=2)
    """Scales brightness/contrast/saturation 0.8 and hue 0.2 (SimCLR's s)."""
    grayscale_p: float = Field(0.2, ge=0, le=1)
    """Probability of converting to grey."""
    blur_p: tuple[float, float] = (0.0, 0.0)
    """Gaussian blur probability for view 1 and view 2 (MoCo v3 / BYOL use 1.0, 0.1)."""
    solarize_p: tuple[float, float] = (0.0, 0.0)
    """Solarization probability for view 1 and view 2 (MoCo v3 uses 0.0, 0.2)."""
    normalize: bool = True
    """Standardise each channel with the dataset mean/std from the manifest."""

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("must be two numbers with 0 < min <= max <= 1")
        return v

    @field_validator("blur_p", "solarize_p")
    @classmethod
    def _probs(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= p <= 1 for p in v):
            raise ValueError("both probabilities must lie in [0, 1]")
        return v
