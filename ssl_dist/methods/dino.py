"""DINO: Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021 (Algorithm 1; reference code
facebookresearch/dino: ``main_dino.py`` ``DINOLoss`` / ``DataAugmentationDINO`` /
``MultiCropWrapper`` in ``utils.py``, ``vision_transformer.py`` ``DINOHead``).

Self-distillation without labels: a student (encoder + :class:`DINOHead`) is trained to match
the output distribution of a teacher, a momentum (EMA) copy of it, across views. The teacher
sees the 2 global crops, the student every crop (2 global + M local, multi-crop); the loss is
the cross-entropy ``-sum_k P_t(x_i)_k log P_s(x_v)_k`` averaged over images and over every
(teacher view i, student view v != i) pair, with ``P_s = softmax(s / T_s)`` and
``P_t = softmax((t - c) / T_t)``. Collapse is avoided by centring (the centre c is an EMA of
the teacher's mean output) and sharpening (a low teacher temperature).

Distributed and scheduled state:

* The centre is a buffer (checkpointed and re-sharded with the module). Its update uses the
  mean teacher output over the GLOBAL batch: each rank's sum is all-reduced, as the reference's
  ``update_center``. The reference updates it at the end of the loss's forward; here ``forward``
  only adds the teacher outputs to a running sum and :meth:`DINO.momentum_update` (once per
  optimizer step, after it, with the EMA of the teacher) applies it. Without gradient
  accumulation this is the reference's order (step t's loss uses the centre of steps < t).
  With ``optim.grad_accum = k`` every micro-batch of a step sees the same centre, and the step
  moves it once with the mean over its k micro-batches: the centre of a run with a k times
  larger batch, matching the gradient, rather than k updates per step.
* The teacher temperature warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp``
  over ``teacher_temp_warmup_steps`` OPTIMIZER STEPS (the reference counts epochs:
  ``np.linspace`` over the warm-up epochs, then constant); the steps done are a buffer
  (``steps_done``, set by :meth:`DINO.momentum_update`), so a resumed run continues the
  schedule.
* The momentum of the teacher follows the half-cosine from ``method.momentum`` (0.996 in the
  paper) to ``method.momentum_final`` (1.0), per step as in the reference.

What differs from the reference:

* The last layer's weight normalisation is written out (``weight_v`` direction, ``weight_g``
  norm, the latter absent with ``norm_last_layer``: every row has norm 1) instead of
  ``nn.utils.weight_norm`` hooks, so that ZeRO-3 gathers its parameters like any other.
* No freezing of the last layer during the first epoch (``freeze_last_layer``), no weight-decay
  schedule (0.04 -> 0.4 in the reference; ``optim.weight_decay`` is constant), and gradient
  clipping only as ``optim.grad_clip`` (the reference clips each parameter's norm at 3.0; here
  the global norm).
* The head has no BatchNorm (the reference's default for ViTs, ``use_bn_in_head=False``); a
  ResNet encoder keeps its own BN, per rank unless ``model.sync_bn``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.config import Config, DinoConfig, MethodConfig, ModelConfig
from ssl_dist.data.multicrop import MultiCropInputs, local_views_for
from ssl_dist.data.shards import Manifest
from ssl_dist.data.views import views_for
from ssl_dist.dist import collectives
from ssl_dist.methods.base import SSLMethod, num_features, pair_metrics
from ssl_dist.models import cosine_momentum, make_momentum_copy
from ssl_dist.precision import full_precision


class WeightNormLinear(nn.Module):
    """``x -> x W^T`` with each row of W the direction ``weight_v`` scaled to the norm
    ``weight_g`` (weight normalisation, Salimans & Kingma 2016); without `learn_norm` every row
    has norm 1 (DINO's ``norm_last_layer``). No bias."""

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool) -> None:
        super().__init__()
        # The direction starts as nn.Linear's default init, as the reference's weight_norm wrap.
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1)) if learn_norm else None

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``[B, in_dim]``. Returns: ``[B, out_dim]``."""
        weight = F.normalize(self.weight_v, dim=1)
        if self.weight_g is not None:
            weight = weight * self.weight_g
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """DINO's projection head (``vision_transformer.py`` ``DINOHead``): a 3-layer MLP with GELU
    ``in_dim -> hidden -> hidden -> bottleneck``, L2 normalisation, then a weight-normalised
    linear layer to `out_dim` logits. MLP weights start truncated-normal (std 0.02), biases 0.

    Args: in_dim: encoder features; cfg: ``out_dim``, ``hidden_dim``, ``bottleneck_dim``,
    ``norm_last_layer``.
    """

    def __init__(self, in_dim: int, cfg: DinoConfig) -> None:
        super().__init__()
        hidden, bottleneck = cfg.hidden_dim, cfg.bottleneck_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck, cfg.out_dim, not cfg.norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``[B, in_dim]``. Returns: logits ``[B, out_dim]``."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def teacher_temperature(step: int, warmup_steps: int, start: float, final: float) -> float:
    """The teacher temperature of optimizer step `step` (0-based): ``np.linspace(start, final,
    warmup_steps)[step]`` during the warm-up, then `final` (the reference's schedule, in steps)."""
    if step >= warmup_steps:
        return final
    if warmup_steps == 1:
        return start
    return start + (final - start) * step / (warmup_steps - 1)


def dino_loss(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float | Tensor,
) -> Tensor:
    """DINO's loss (``DINOLoss.forward``): the cross-entropy between the centred, sharpened
    teacher distribution of each global view and the student distribution of every other view,
    averaged over images and over the ``2 (V - 1)`` (teacher view, student view) pairs.

    Computed in float32 (float64 inputs stay float64) with autocast off; the teacher is detached.

    Args:
        student: Student logits ``[V, N, K]``, views first: the 2 global ones, then the local.
        teacher: Teacher logits of the 2 global views ``[2, N, K]``.
        center: ``[K]``, subtracted from the teacher logits.
        student_temp, teacher_temp: Softmax temperatures (the teacher's may be a 0-d tensor).

    Returns: scalar, the mean over local images (the trainer averages ranks).
    """
    if student.ndim != 3 or student.shape[0] < 2 or teacher.shape != (2, *student.shape[1:]):
        raise ValueError(
            f"student must be [V >= 2, N, K] and teacher [2, N, K]; got "
            f"{tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    with full_precision(student.device.type):
        log_p = F.log_softmax(student.to(dtype) / student_temp, dim=-1)  # [V, N, K]
        t = (teacher.detach().to(dtype) - center.to(dtype)) / teacher_temp
        q = F.softmax(t, dim=-1)  # [2, N, K]
        # ce[i, v] = mean over images of -sum_k q_i log p_v, for every pair at once.
        ce = -torch.einsum("ink,vnk->iv", q, log_p) / student.shape[1]  # [2, V]
        pairs = ~torch.eye(2, student.shape[0], dtype=torch.bool, device=ce.device)
        return ce[pairs].mean()


class DINO(SSLMethod):
    """Student (online encoder + :class:`DINOHead`) and teacher (their momentum copies,
    ``requires_grad=False``, moved by EMA after each optimizer step; they follow the module's
    train / eval mode), multi-crop inputs (:class:`~ssl_dist.data.multicrop.MultiCropInputs`).

    Args:
        method: Method config (``momentum``, ``momentum_final``, ``dino``).
        model: Model config (the encoder).
        in_chans: Input channels.
        image_size: Side of the global views (ViTs also take the local side).
    """

    name: ClassVar[str] = "dino"
    any_input_size: ClassVar[bool] = True
    center: Tensor
    steps_done: Tensor
    pending_sum: Tensor
    pending_count: Tensor

    def __init__(
        self, method: MethodConfig, model: ModelConfig, in_chans: int, image_size: int
    ) -> None:
        super().__init__(method, model, in_chans, image_size)
        cfg = method.dino
        self.head = DINOHead(num_features(self.encoder), cfg)
        self.momentum_encoder = make_momentum_copy(self.encoder)
        self.momentum_head = make_momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(cfg.out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        # This step's teacher outputs, summed until momentum_update (not model state).
        self.register_buffer("pending_sum", torch.zeros(cfg.out_dim), persistent=False)
        self.register_buffer("pending_count", torch.zeros(()), persistent=False)

    def make_inputs(
        self, cfg: Config, manifest: Manifest, device: torch.device | str
    ) -> MultiCropInputs:
        """The 2 global views and ``method.dino.local_crops`` local ones per image."""
        d = self.cfg.dino
        local = local_views_for(cfg, manifest, d.local_size, d.local_scale, d.local_blur_p)
        return MultiCropInputs(views_for(cfg, manifest), local, d.local_crops, device)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.momentum_encoder, self.encoder), (self.momentum_head, self.head)]

    def momentum_at(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.cfg.momentum, self.cfg.momentum_final)

    def momentum_update(self, step: int, total_steps: int) -> float:
        """The teacher's EMA, then the centre's update with this step's teacher outputs (a
        collective: every rank calls it), and the step count of the temperature schedule."""
        m = super().momentum_update(step, total_steps)
        self.update_center()
        self.steps_done.fill_(step)
        return m

    def teacher_temp(self) -> Tensor:
        """Teacher temperature of the coming step, :func:`teacher_temperature` of
        ``steps_done`` as a float64 0-d tensor on the buffer's device (no host sync)."""
        d = self.cfg.dino
        start, final, warmup = d.warmup_teacher_temp, d.teacher_temp, d.teacher_temp_warmup_steps
        step = self.steps_done.double()
        ramp = start + (final - start) * step / max(warmup - 1, 1)
        return torch.where(step >= warmup, torch.full_like(step, final), ramp)

    @torch.no_grad()
    def update_center(self) -> None:
        """``c <- m c + (1 - m) mean(teacher outputs)``, the mean over the teacher outputs of
        every rank since the last update (all-reduced); nothing when there were none."""
        both = torch.cat([self.pending_sum, self.pending_count.view(1)])
        both = collectives.all_reduce_mean(both)  # sums / W: their ratio is the global mean
        self.pending_sum.zero_()
        self.pending_count.zero_()
        m, count = self.cfg.dino.center_momentum, both[-1]
        moved = self.center * m + both[:-1] / count.clamp_min(1) * (1 - m)
        self.center.copy_(torch.where(count > 0, moved, self.center))  # no host sync

    def forward(
        self, x1: Tensor, x2: Tensor, local: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x1, x2: global views ``[N, C, H, W]``; local: local views ``[N, M, C, h, w]``
        or None. Returns: the loss (mean over local images) and ``teacher_temp``,
        ``teacher_entropy`` (nats; 0 is a one-hot teacher, ``log K`` a uniform one: both are
        collapse), ``pos_sim`` (student view 1 vs teacher view 2 logits), ``alignment`` /
        ``uniformity`` (backbone features of the global views)."""
        self.check_views(x1, x2)
        n = x1.shape[0]
        globals_ = torch.cat([x1, x2])  # [2N, C, H, W]: one encoder batch, as the reference
        h = self.encoder(globals_)  # [2N, F]
        features = [h]
        if local is not None:
            if local.ndim != 5 or local.shape[0] != n:
                raise ValueError(f"local must be [N={n}, M, C, h, w], got {tuple(local.shape)}")
            features.append(self.encoder(local.transpose(0, 1).flatten(0, 1)))  # [M N, F]
        student = self.head(torch.cat(features)).unflatten(0, (-1, n))  # [2 + M, N, K]
        with torch.no_grad():
            teacher = self.momentum_head(self.momentum_encoder(globals_)).unflatten(0, (2, n))
        temp = self.teacher_temp()
        loss = dino_loss(student, teacher, self.center, self.cfg.dino.student_temp, temp)
        with torch.no_grad():
            self.pending_sum.add_(teacher.flatten(0, 1).to(self.pending_sum.dtype).sum(0))
            self.pending_count.add_(2 * n)
        metrics = pair_metrics(h[:n], h[n:], student[0], teacher[1])
        metrics["teacher_temp"] = temp.detach().float()
        metrics["teacher_entropy"] = self._entropy(teacher, temp)
        return loss, metrics

    @torch.no_grad()
    def _entropy(self, teacher: Tensor, temp: Tensor) -> Tensor:
        with full_precision(teacher.device.type):
            t = (teacher.float() - self.center.float()) / temp
            return -(F.softmax(t, -1) * F.log_softmax(t, -1)).sum(-1).mean()
