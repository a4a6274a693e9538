"""The task seam every method implements, and shared metrics.

A method is one ``nn.Module`` that owns every network it needs (online encoder and heads, and for
MoCo a frozen momentum copy) and its inputs:

* ``make_inputs(cfg, manifest, device)`` returns the builder that turns a decoded batch into the
  method's forward arguments on the device (two augmented views for SimCLR / MoCo; rotated
  images and their labels for rotation prediction; ...);
* ``forward(*inputs)`` returns the loss of THIS rank plus a few detached metrics. Losses are
  means over local anchors / queries / samples (see :mod:`ssl_dist.losses`): the trainer
  averages gradients over ranks (DDP / DeepSpeed) and never rescales by the world size;
* ``momentum_pairs()`` names the ``(target, online)`` networks moved by EMA after each step;
* ``world_size_problem(...)`` says whether a world size is allowed (before anything is built)
  and ``resize(...)`` carries the method's own state over to a new world size (elastic runs).

Training-loop contract (:func:`ssl_dist.train.runtime.run_steps` is the one loop)::

    inputs = method.make_inputs(cfg, manifest, device)
    loss, metrics = method(*inputs(batch, seed))   # or engine(*...) under DeepSpeed
    loss.backward(); optimizer.step()               # optimizer over trainable_parameters()
    m = method.momentum_update(step, total_steps)   # after each optimizer step
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.config import Config, MethodConfig, ModelConfig
from ssl_dist.data.shards import Manifest
from ssl_dist.data.views import TwoViewInputs, views_for
from ssl_dist.models import build_encoder, ema_update
from ssl_dist.precision import full_precision


class Inputs(Protocol):
    """Builds a task's forward arguments on the device from a decoded batch (a task owns its
    inputs): ``inputs(batch, seed) -> tuple of tensors``; `seed` makes the augmentation
    reproducible."""

    def __call__(self, batch: Any, seed: int) -> tuple[Tensor, ...]: ...


UNIFORMITY_T = 2.0
"""Temperature t of the uniformity metric (Wang & Isola 2020 use t = 2)."""


class SSLMethod(nn.Module):
    """Base class: a self-supervised method that turns two views into a loss.

    ``forward(*inputs)`` takes what :meth:`make_inputs` builds (two-view methods: the views
    ``x1, x2`` ``[N, C, H, W]`` of the same N local images) and returns ``(loss, metrics)``: the
    scalar loss (mean over local anchors, with gradient) and named detached scalar tensors.

    Attributes:
        name: Registry key (``MethodConfig.name``).
        encoder: The online backbone ``[B, C, H, W] -> [B, F]`` (pooled features); this is the
            network kept after pretraining (kNN monitor, linear evaluation, registry).
    """

    name: ClassVar[str] = ""
    any_input_size: ClassVar[bool] = False
    """The encoder takes inputs of other sides than `image_size` (multi-crop: ViTs are built
    with an interpolated position embedding)."""
    encoder: nn.Module

    def __init__(
        self, method: MethodConfig, model: ModelConfig, in_chans: int, image_size: int
    ) -> None:
        """Every method: its config (``self.cfg``) and the online encoder, built first (so a
        seed fixes the encoder's init whatever heads the method adds after it)."""
        super().__init__()
        self.cfg = method
        self.encoder = build_encoder(model, in_chans, image_size, any_size=self.any_input_size)

    def make_inputs(self, cfg: Config, manifest: Manifest, device: torch.device | str) -> Inputs:
        """The builder of this method's forward arguments from a decoded batch, on `device`.
        Default: two augmented views ``(x1, x2)`` (:class:`~ssl_dist.data.views.TwoViews`)."""
        return TwoViewInputs(views_for(cfg, manifest), device)

    def example_inputs(self, n: int, channels: int, size: int) -> tuple[Tensor, ...]:
        """Random forward arguments for `n` images of `channels` x `size` x `size` (what
        :meth:`make_inputs` would build; two-view methods: two views), for counting FLOPs."""
        return torch.randn(n, channels, size, size), torch.randn(n, channels, size, size)

    @classmethod
    def world_size_problem(
        cls, method: MethodConfig, per_rank_batch: int, world_size: int
    ) -> str | None:
        """Why this method cannot train `per_rank_batch` images per rank on `world_size` ranks
        (checked for every size of an elastic range before anything starts), or None."""
        return None

    def resize(self, per_rank_batch: int, world_size: int) -> None:
        """Carry the method's own state over to a new world size (after a checkpoint written
        at another size is loaded). Nothing to do for stateless methods."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates: everything with ``requires_grad`` (momentum copies
        are frozen, so they are left out)."""
        return [p for p in self.parameters() if p.requires_grad]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(momentum copy, online module)`` pairs moved by :meth:`momentum_update`."""
        return []

    def momentum_at(self, step: int, total_steps: int) -> float:
        """Momentum of the key encoder after ``step`` of ``total_steps`` optimizer steps."""
        return 0.0

    def momentum_update(self, step: int, total_steps: int) -> float:
        """EMA-update every momentum copy; call after each optimizer step.

        Args:
            step: Optimizer steps taken so far, counting the one just taken (1 after the first
                step). This matches moco-v3, which updates with ``m(i)`` at the start of
                iteration i (0-based), i.e. after i optimizer steps.
            total_steps: Optimizer steps of the whole run (for scheduled momentum).

        Returns:
            The momentum used (0.0 for methods without a momentum encoder, which do nothing).
        """
        m = self.momentum_at(step, total_steps)
        for target, online in self.momentum_pairs():
            ema_update(target, online, m)
        return m

    @staticmethod
    def check_views(x1: Tensor, x2: Tensor) -> None:
        """Raise ``ValueError`` unless the views are batches of the same shape."""
        if x1.shape != x2.shape or x1.ndim < 2 or x1.shape[0] < 1:
            raise ValueError(
                f"x1 and x2 must be batches of one shape; got {tuple(x1.shape)}, {tuple(x2.shape)}"
            )


def num_features(encoder: nn.Module) -> int:
    """The ``num_features`` int every encoder of :func:`ssl_dist.models.build_encoder` exposes."""
    n = getattr(encoder, "num_features", None)
    if not isinstance(n, int):
        raise TypeError(f"{type(encoder).__name__} has no int attribute num_features")
    return n


def alignment(a: Tensor, b: Tensor) -> Tensor:
    """Alignment ``E ||a_i - b_i||^2`` of L2-normalised positive pairs (Wang & Isola, ICML 2020,
    "Understanding Contrastive Representation Learning through Alignment and Uniformity on the
    Hypersphere", eq. 4 with alpha = 2). Lower is better; 0 means identical directions.

    Args: a, b: ``[N, F]``, row i of ``a`` and ``b`` a positive pair. Returns: scalar.
    """
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    return (a - b).pow(2).sum(dim=1).mean()


def uniformity(x: Tensor, t: float = UNIFORMITY_T) -> Tensor:
    """Uniformity ``log E_{i<j} exp(-t ||x_i - x_j||^2)`` of L2-normalised rows (Wang & Isola
    2020, eq. 5). Lower (more negative) is more uniform; the minimum for points on a circle pair
    at opposite poles is ``-4 t``.

    Args: x: ``[N, F]`` with N >= 2 (NaN for N < 2, where no pair exists). Returns: scalar.
    """
    x = F.normalize(x.float(), dim=1)
    sq = torch.pdist(x).pow(2)
    return sq.mul(-t).exp().mean().log()


def positive_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine similarity of positive pairs ``[N, D] x [N, D] -> scalar``."""
    return F.cosine_similarity(a.float(), b.float(), dim=1).mean()


@torch.no_grad()
def pair_metrics(h1: Tensor, h2: Tensor, e1: Tensor, e2: Tensor) -> dict[str, Tensor]:
    """Detached metrics shared by all methods.

    Args:
        h1, h2: Online backbone features of the two views ``[N, F]`` (the representation kept
            after pretraining): ``alignment`` between them and ``uniformity`` of ``h1``.
        e1, e2: Positive pairs of the embedding the loss compares ``[N, D]``: ``pos_sim``.

    Computed in float32 with autocast off (under bf16 mixed precision too).
    """
    with full_precision(h1.device.type):
        return {
            "pos_sim": positive_similarity(e1, e2),
            "alignment": alignment(h1, h2),
            "uniformity": uniformity(h1),
        }
