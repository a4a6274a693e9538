"""MoCo v2 and MoCo v3: a query encoder trained by gradient against a momentum key encoder.

* MoCo v2: He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation
  Learning", CVPR 2020 (Algorithm 1, shuffle-BN in sec. 3.3) with the MLP head of Chen, Fan,
  Girshick, He, "Improved Baselines with Momentum Contrastive Learning", 2020.
* MoCo v3: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers",
  ICCV 2021 (Algorithm 1; facebookresearch/moco-v3 ``moco/builder.py``).

Both use a SYMMETRISED loss over the two views: every view is once a query and once a key, so
each image contributes two loss terms per step, as in MoCo v3.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.config import MethodConfig, ModelConfig
from ssl_dist.dist import collectives
from ssl_dist.losses import info_nce_loss, infonce_bound
from ssl_dist.methods.base import SSLMethod, num_features, pair_metrics
from ssl_dist.models import (
    build_predictor,
    build_projector,
    cosine_momentum,
    make_momentum_copy,
)


class _MoCo(SSLMethod):
    """Online encoder + projector and their frozen momentum copies (``requires_grad=False``)."""

    def __init__(
        self,
        method: MethodConfig,
        model: ModelConfig,
        in_chans: int,
        image_size: int,
        last_bn: bool,
    ) -> None:
        super().__init__(method, model, in_chans, image_size)
        self.projector = build_projector(model, num_features(self.encoder), last_bn=last_bn)
        self.momentum_encoder = make_momentum_copy(self.encoder)
        self.momentum_projector = make_momentum_copy(self.projector)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.momentum_encoder, self.encoder), (self.momentum_projector, self.projector)]

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Momentum-encoder projections ``[N, C, H, W] -> [N, D]``, no gradient. The momentum
        networks follow the module's train/eval mode (batch statistics in training, as in MoCo)."""
        return self.momentum_projector(self.momentum_encoder(x))


class MoCoV3(_MoCo):
    """MoCo v3: queries from encoder -> projector -> predictor, keys from the momentum encoder
    and projector; negatives are the other keys of the gathered global batch (no queue).

    Loss (moco-v3 ``builder.py``): ``2 * T * (InfoNCE(q1, k2) + InfoNCE(q2, k1))``; the factor ``T``
    cancels the ``1 / T`` of the logits in the gradient scale. Keys are gathered from all
    ranks without gradient when ``cfg.gather``. The projector ends in an affine-free BN and the
    momentum follows a half-cosine from ``cfg.momentum`` to ``cfg.momentum_final``.

    Args:
        method: Method config (``temperature``, ``gather``, ``momentum``, ``momentum_final``).
        model: Model config (encoder, projector and predictor widths).
        in_chans: Input channels.
        image_size: Input side (ViTs are built for it).
    """

    name: ClassVar[str] = "moco_v3"

    def __init__(
        self, method: MethodConfig, model: ModelConfig, in_chans: int, image_size: int
    ) -> None:
        super().__init__(method, model, in_chans, image_size, last_bn=True)
        self.predictor = build_predictor(model)

    def momentum_at(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.cfg.momentum, self.cfg.momentum_final)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x1, x2: views ``[N, C, H, W]``. Returns: the symmetric loss (mean over local
        queries) and ``pos_sim`` (queries vs keys), ``alignment`` / ``uniformity`` (backbone),
        ``infonce_bound_nats`` (``log(N_g) - L`` with L the mean of the two InfoNCE terms
        before the ``2 T`` factor: each query's softmax runs over the N_g keys of the gathered
        global batch; N_g = N without ``gather``)."""
        self.check_views(x1, x2)
        h1, h2 = self.encoder(x1), self.encoder(x2)  # [N, F]; separate BN batches per view
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))  # [N, D]
        k1, k2 = self.keys(x1), self.keys(x2)  # [N, D]
        t, gather = self.cfg.temperature, self.cfg.gather
        both = info_nce_loss(q1, k2, t, gather=gather) + info_nce_loss(q2, k1, t, gather=gather)
        loss = 2 * t * both
        metrics = pair_metrics(h1, h2, torch.cat([q1, q2]), torch.cat([k2, k1]))
        n_global = x1.shape[0] * (collectives.world_size() if gather else 1)
        metrics["infonce_bound_nats"] = infonce_bound(both / 2, n_global)
        return loss, metrics


class MoCoV2(_MoCo):
    """MoCo v2: encoder -> MLP projector, negatives from a queue of past keys.

    Loss: ``(InfoNCE(q1, k2; queue) + InfoNCE(q2, k1; queue)) / 2``. The original v2 is the
    asymmetric ``InfoNCE(q1, k2; queue)``; the symmetric mean keeps its scale (log(1+K) at
    chance) and uses each image twice per step, as MoCo v3 does. Only the keys of view 2 are
    enqueued, so each step adds one key per image and ``K`` must be a multiple of the global
    batch (``cfg.queue_size`` % (per-rank batch x world size) == 0), as in MoCo. Keys are gathered
    from every rank (rank order) and enqueued identically on every rank, so the queue is the same
    everywhere and equal to a single process's queue for the same global batches.

    Shuffle-BN (MoCo sec. 3.3): with ``cfg.shuffle_bn`` and more than one rank, the key batch is
    gathered, permuted by a permutation drawn on rank 0 and broadcast, each rank encodes its
    slice, and the keys are un-shuffled: a key's BN statistics come from a random subset of the
    global batch instead of the batch its query was normalised with, which removes the
    intra-batch "cheating" signal MoCo describes. SyncBatchNorm would be the other cure but does
    not run on CPU, so on CPU MoCo v2 relies on shuffle-BN. In one process shuffle-BN is skipped:
    permuting inside a single BN batch changes nothing, so a single-process run keeps that leak.

    The projector is :func:`ssl_dist.models.build_projector` (hidden layers with BN), whereas the
    v2 reference MLP has no BN; the queue starts as unit-norm Gaussian rows drawn from a fixed
    seed, so it is identical on every rank without a broadcast.

    Args:
        method: Method config (``temperature``, ``gather``, ``momentum``, ``queue_size``,
            ``shuffle_bn``). ``gather=False`` enqueues only local keys (each rank its own queue;
            K then has to be a multiple of the per-rank batch) and skips shuffle-BN.
        model: Model config.
        in_chans: Input channels.
        image_size: Input side.
        queue_seed: Seed of the initial queue.
    """

    name: ClassVar[str] = "moco_v2"
    queue: Tensor
    queue_ptr: Tensor
    queue_filled: Tensor

    def __init__(
        self,
        method: MethodConfig,
        model: ModelConfig,
        in_chans: int,
        image_size: int,
        queue_seed: int = 0,
    ) -> None:
        super().__init__(method, model, in_chans, image_size, last_bn=False)
        gen = torch.Generator().manual_seed(queue_seed)
        init = torch.randn(method.queue_size, model.proj_dim, generator=gen)
        self.register_buffer("queue", F.normalize(init, dim=1))  # [K, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def momentum_at(self, step: int, total_steps: int) -> float:
        return self.cfg.momentum

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x1, x2: views ``[N, C, H, W]``. Returns: the symmetric loss (mean over local
        queries) and ``pos_sim``, ``alignment``, ``uniformity``, ``queue_fill`` (fraction of the
        queue holding real keys), ``infonce_bound_nats`` (``log(1 + K) - loss``: each query's
        softmax runs over its key and the K queued ones). Enqueues this step's keys after
        computing the loss.

        Raises:
            ValueError: if ``queue_size`` is not a multiple of the keys enqueued per step.
        """
        self.check_views(x1, x2)
        self._check_queue_size(x1.shape[0])
        h1, h2 = self.encoder(x1), self.encoder(x2)  # [N, F]
        q1, q2 = self.projector(h1), self.projector(h2)  # [N, D]
        k1, k2, k2_all = self._keys_of_views(x1, x2)
        t = self.cfg.temperature
        loss = 0.5 * (
            info_nce_loss(q1, k2, t, queue=self.queue) + info_nce_loss(q2, k1, t, queue=self.queue)
        )
        metrics = pair_metrics(h1, h2, torch.cat([q1, q2]), torch.cat([k2, k1]))
        metrics["infonce_bound_nats"] = infonce_bound(loss, 1 + self.queue.shape[0])
        self._enqueue(k2_all if self.cfg.gather else k2)
        metrics["queue_fill"] = self.queue_filled.float() / self.queue.shape[0]
        return loss, metrics

    @classmethod
    def world_size_problem(
        cls, method: MethodConfig, per_rank_batch: int, world_size: int
    ) -> str | None:
        """The queue takes one global batch of keys per step (one rank's batch without
        ``gather``), at a pointer that must stay a multiple of it: ``queue_size`` must be a
        multiple of the keys enqueued per step."""
        world = world_size if method.gather else 1
        per_step = per_rank_batch * world
        if method.queue_size % per_step == 0:
            return None
        return (
            f"method.queue_size={method.queue_size} must be a multiple of the keys enqueued per "
            f"step, the global batch {per_step} (= {per_rank_batch} per rank x {world} ranks); "
            f"e.g. method.queue_size={per_step * max(1, round(method.queue_size / per_step))}"
        )

    def resize(self, per_rank_batch: int, world_size: int) -> None:
        """The queue pointer realigned to the new number of keys per step."""
        self.realign_queue(per_rank_batch * (world_size if self.cfg.gather else 1))

    def _check_queue_size(self, per_rank: int) -> None:
        world = collectives.world_size()
        cfg = self.cfg.model_copy(update={"queue_size": self.queue.shape[0]})
        problem = self.world_size_problem(cfg, per_rank, world)
        if problem:
            raise ValueError(problem)

    @torch.no_grad()
    def _keys_of_views(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys ``k1, k2 [N, D]`` of the local views and ``k2`` of the whole world ``[N_g, D]``
        in rank order (just the local ``k2`` without ``cfg.gather``)."""
        if self.cfg.gather and self.cfg.shuffle_bn and collectives.world_size() > 1:
            return self._shuffled_keys(x1, x2)
        k1, k2 = self.keys(x1), self.keys(x2)
        return k1, k2, collectives.all_gather_no_grad(k2) if self.cfg.gather else k2

    @torch.no_grad()
    def _shuffled_keys(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Shuffle-BN (MoCo ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``).

        Gathers both views ``[N_g, 2, C, H, W]``, permutes the global batch with rank 0's
        permutation, encodes this rank's slice of N images (each view its own BN batch), gathers
        the keys and undoes the permutation. Returns as :meth:`_keys_of_views`.
        """
        r, n = collectives.rank(), x1.shape[0]
        n_global = n * collectives.world_size()
        views = collectives.all_gather_no_grad(torch.stack([x1, x2], dim=1))  # [N_g, 2, ...]
        drawn = torch.randperm(n_global).tolist() if r == 0 else []
        perm = torch.tensor(collectives.broadcast_object(drawn), device=x1.device)
        mine = views[perm[r * n : (r + 1) * n]]  # [N, 2, C, H, W]
        k = torch.stack([self.keys(mine[:, 0]), self.keys(mine[:, 1])], dim=1)  # [N, 2, D]
        k_all = collectives.all_gather_no_grad(k)[torch.argsort(perm)]  # [N_g, 2, D] global order
        local = k_all[r * n : (r + 1) * n]
        return local[:, 0], local[:, 1], k_all[:, 1]

    @torch.no_grad()
    def realign_queue(self, keys_per_step: int) -> None:
        """After a world-size change: each step writes `keys_per_step` keys at a pointer that
        must be a multiple of it, so move the pointer up to the next multiple (the rows it skips
        hold the oldest keys, overwritten on the next pass)."""
        p = int(self.queue_ptr)
        if p % keys_per_step:
            self.queue_ptr.fill_((p + keys_per_step - p % keys_per_step) % self.queue.shape[0])

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Write normalised ``keys [M, D]`` at ``queue_ptr`` (M divides K) and advance it."""
        size, m = self.queue.shape[0], keys.shape[0]
        ptr = int(self.queue_ptr)
        self.queue[ptr : ptr + m] = F.normalize(keys, dim=1).to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + m) % size)
        self.queue_filled.fill_(min(size, int(self.queue_filled) + m))
