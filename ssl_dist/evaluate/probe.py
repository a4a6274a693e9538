"""The linear probe: how well a frozen encoder's features separate the classes.

The frozen encoder encodes every train and val image once (the plain, un-augmented view);
features are standardised with the train mean / std; a linear classifier is fitted by full-batch
L-BFGS on cross-entropy plus an L2 penalty (zero init, so the fit is deterministic: the problem
is convex). The penalty is chosen from a small grid on a seeded held-out 20% of train, the
classifier is refitted on all of train with it, and top-1 (and top-5 with more than 5 classes) is
measured on val. Used by ``ssl-dist finetune --mode linear``, the retrain job's comparison and
the quality bench.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_dist.artifact import Artifact
from ssl_dist.config import Config, ConfigError, DataConfig
from ssl_dist.data.shards import MANIFEST
from ssl_dist.data.stream import open_shards
from ssl_dist.data.views import views_for
from ssl_dist.evaluate.knn import extract_features

WD_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
"""L2 penalties the linear probe chooses from (on the mean cross-entropy)."""
HOLDOUT = 0.2
"""Share of train held out to choose the penalty."""
EVAL_BATCH = 256
"""Images per forward pass when encoding for evaluation (BN in eval mode: any size gives the
same features)."""


def manifest_path(data_dir: str | Path) -> str:
    """The manifest of a shard directory (or the manifest file itself, or a URL to it)."""
    s = str(data_dir)
    if "://" in s:
        return s if s.endswith(".json") else f"{s.rstrip('/')}/{MANIFEST}"
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".json":
        return str(p.resolve())
    if not p.is_dir():
        raise ConfigError(f"data {s!r} does not exist (a shard directory with {MANIFEST})")
    if not (p / MANIFEST).is_file():
        raise ConfigError(f"data {s!r} has no {MANIFEST}: write it with `ssl-dist data prepare`")
    return str((p / MANIFEST).resolve())


def data_config(cfg: Config, manifest: str, batch_size: int | None = None) -> DataConfig:
    """The source's data config (image size, channels, split names) on another shard set."""
    tree = cfg.data.model_dump(mode="json")
    tree.update(
        manifest=manifest, shards=None, allow_unsafe=False, mode="exact", steps_per_epoch=None
    )
    if batch_size is not None:
        tree["batch_size"] = batch_size
    return DataConfig.model_validate(tree)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hit.float().mean().item()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def fit_linear(
    x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int = 300
) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS from zero (deterministic).

    Minimises ``mean CE + weight_decay / 2 * ||W||^2`` (the bias is not penalised).
    """
    lin = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(
        lin.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 0.5 * weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # type: ignore[no-untyped-call]
    return lin.requires_grad_(False)


def probe_features(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    wd_grid: Sequence[float] = WD_GRID,
    seed: int = 0,
    max_iter: int = 300,
) -> dict[str, Any]:
    """Choose the penalty on a held-out 20% of train, refit on all of train, score val."""
    if len(train_y) < 5 or len(val_y) == 0:
        raise ConfigError(
            f"the linear probe needs labelled train and val samples ({len(train_y)} train, "
            f"{len(val_y)} val)"
        )
    if not wd_grid:
        raise ValueError("wd_grid is empty")
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, round(HOLDOUT * len(train_y)))
    hold, fit = perm[:n_hold], perm[n_hold:]
    scores: dict[float, tuple[float, float]] = {}
    for wd in wd_grid:
        lin = fit_linear(tx[fit], train_y[fit], num_classes, wd, max_iter)
        logits = lin(tx[hold])
        scores[wd] = (
            topk_accuracy(logits, train_y[hold], 1),
            F.cross_entropy(logits, train_y[hold]).item(),
        )
    # Best held-out top-1; ties go to the lower held-out loss.
    best = max(wd_grid, key=lambda w: (scores[w][0], -scores[w][1]))
    lin = fit_linear(tx, train_y, num_classes, best, max_iter)
    logits = lin(vx)
    out: dict[str, Any] = {
        "top1": topk_accuracy(logits, val_y, 1),
        "top5": topk_accuracy(logits, val_y, 5) if num_classes > 5 else None,
        "weight_decay": best,
        "holdout_top1": {str(w): scores[w][0] for w in wd_grid},
        "train_top1": topk_accuracy(lin(tx), train_y, 1),
        "n_train": len(train_y),
        "n_val": len(val_y),
        "num_classes": num_classes,
        "feature_dim": int(train_x.shape[1]),
    }
    return out


def linear_probe(
    source: Artifact,
    data_dir: str | Path,
    *,
    wd_grid: Sequence[float] = WD_GRID,
    seed: int = 0,
    max_iter: int = 300,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Linear-probe accuracy of the source's frozen encoder on the shard set `data_dir`.

    Args:
        source: The encoder and its pretraining config (image size, channels, split names).
        data_dir: Shard directory with ``manifest.json`` (the config's train and val splits).
        wd_grid: L2 penalties to choose from on a held-out 20% of train.
        seed: Seed of the held-out split.
        max_iter: L-BFGS iterations per fit.
        device: Where to encode (default: CUDA when available).

    Returns:
        ``top1``, ``top5`` (None with 5 classes or fewer), ``weight_decay`` (chosen),
        ``holdout_top1`` per penalty, ``train_top1``, ``n_train``, ``n_val``, ``num_classes``,
        ``feature_dim``, ``seconds``, ``data`` (the manifest).
    """
    start = time.perf_counter()
    manifest = manifest_path(data_dir)
    data = data_config(source.cfg, manifest, batch_size=EVAL_BATCH)
    shards = open_shards(data)
    cfg = source.cfg.model_copy(update={"data": data})
    views = views_for(cfg, shards.manifest)
    dev = torch.device(device) if device is not None else default_device()
    encoder = source.build_encoder().to(dev)
    views = views.to(dev)
    train_x, train_y = extract_features(encoder, data, data.split, views, dev)
    val_x, val_y = extract_features(encoder, data, data.val_split, views, dev)
    num_classes = len(shards.manifest.classes)
    out = probe_features(train_x, train_y, val_x, val_y, num_classes, wd_grid, seed, max_iter)
    out.update(seconds=time.perf_counter() - start, data=manifest, wd_grid=list(wd_grid))
    return out
