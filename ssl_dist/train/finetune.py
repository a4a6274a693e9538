"""The Ray Train worker of full fine-tuning (``ssl-dist finetune --mode full``).

The encoder plus a new head (:class:`~ssl_dist.methods.classify.Classifier`) trained end to end
with cross-entropy through the same DeepSpeed engine and step loop as pretraining. Each worker
streams its share of train (exact mode: every sample once per epoch) and feeds the plain view. At
the end rank 0 evaluates the consolidated model on val and reports it with a checkpoint holding
the fine-tuned encoder artifact (``encoder.safetensors``, ``config.yaml``),
``classifier.safetensors`` (encoder + head) and ``results.json``. The driver side is
:func:`ssl_dist.evaluate.finetune.full_finetune`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from ssl_dist import precision
from ssl_dist.artifact import build_encoder, encoder_state, save_tensors, write_artifact
from ssl_dist.atomic import write_atomic
from ssl_dist.config import Config, ConfigError, DataConfig
from ssl_dist.data.stream import open_shards, stream
from ssl_dist.dist import collectives, zero
from ssl_dist.evaluate.probe import topk_accuracy
from ssl_dist.methods.classify import Classifier
from ssl_dist.train.parts import plan_steps
from ssl_dist.train.runtime import DeepSpeedBackend, Hook, Position, run_steps

CLASSIFIER = "classifier.safetensors"
RESULTS = "results.json"


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of ``full`` mode (every rank runs the same steps); the source's
    weights arrive as safetensors bytes in Ray's object store (``config["weights"]``)."""
    import ray.train  # heavy (seconds): only on the workers, not where the command starts

    cfg = Config.model_validate(config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    use_cuda = cfg.scaling.use_gpu != "no" and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    shards = open_shards(cfg.data)
    plan = plan_steps(cfg, shards, world_size)
    num_classes = len(shards.manifest.classes)
    tensors = load_safetensors(ray.get(config["weights"]))  # bytes -> tensors, no pickle

    def classifier() -> Classifier:
        torch.manual_seed(cfg.run.seed)  # the same head on every rank
        return Classifier(build_encoder(cfg, tensors), num_classes)

    model = classifier().to(device)
    inputs = model.make_inputs(cfg, shards.manifest, device)
    engine = zero.build_engine(
        model, cfg.zero, cfg.optim, cfg.data.batch_size, world_size, plan.peak_lr
    )
    if rank == 0:
        print(precision.describe(cfg.zero.precision, device), file=sys.stderr)
    epochs = _EpochLoss(cfg.run.epochs, rank, device)
    start = time.perf_counter()
    state = run_steps(
        DeepSpeedBackend(engine),
        inputs,
        lambda epoch: stream(cfg.data, rank, world_size, epoch, cfg.run.seed, shards=shards),
        plan.schedule(cfg),
        Position(),
        [epochs],
    )
    step, mean = state.step, epochs.last
    seconds = time.perf_counter() - start
    full = zero.consolidated_state_dict(engine)  # a collective under ZeRO-3: every rank
    metrics: dict[str, Any] = {
        "steps": step,
        "epochs": cfg.run.epochs,
        "train_loss": mean,
        "train_seconds": seconds,
        "world_size": world_size,
        "global_batch": plan.global_batch,
        "train_samples_per_epoch": plan.batches_per_epoch * cfg.data.batch_size * world_size,
    }
    with tempfile.TemporaryDirectory(prefix="ssl-dist-finetune-") as tmp:
        checkpoint = None
        if rank == 0:
            assert full is not None
            final = classifier()
            final.load_state_dict(full, strict=True)
            metrics.update(evaluate(final.to(device), cfg.data, inputs.views, num_classes, device))
            d = Path(tmp)
            write_artifact(d, encoder_state(full), cfg, finetuned="full")
            meta = {"encoder": cfg.model.encoder, "finetuned": "full"}
            save_tensors(d / CLASSIFIER, encoder_state(full, prefix=""), meta)
            write_atomic(d / RESULTS, json.dumps(metrics, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


class _EpochLoss(Hook):
    """The mean train loss of each epoch over all ranks, printed by rank 0 (a runtime hook).
    Summed on the device: no CPU-GPU sync per step; one all-reduce per epoch."""

    def __init__(self, epochs: int, rank: int, device: torch.device) -> None:
        self.epochs, self.rank = epochs, rank
        self.sum, self.batches = torch.zeros((), device=device), 0
        self.last = float("nan")

    def after_step(self, state, out) -> None:
        self.sum += out.loss.float()
        self.batches += 1

    def after_epoch(self, state) -> None:
        self._close(state.epoch, state.step)

    def after_run(self, state) -> None:
        if self.batches:  # the run ended inside an epoch (its step budget)
            self._close(state.epoch + 1, state.step)

    def _close(self, epoch: int, step: int) -> None:
        self.last = collectives.all_reduce_mean(self.sum / max(self.batches, 1)).item()
        self.sum.zero_()
        self.batches = 0
        if self.rank == 0:
            print(
                f"finetune epoch {epoch}/{self.epochs}: step {step}, train loss {self.last:.4f}",
                file=sys.stderr,
            )


@torch.no_grad()
def evaluate(
    model: Classifier,
    data: DataConfig,
    views: Any,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Top-1 / top-5 of a classifier on the val split (one process reads it all)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in stream(data, 0, 1, 0, split=data.val_split, partial=True):
            logits.append(model.logits(views.plain(batch.eval_images().to(device))).float().cpu())
            labels.append(batch.labels)
    finally:
        model.train(was_training)
    if not logits:
        raise ConfigError(f"split {data.val_split!r} of {data.manifest} is empty")
    z, y = torch.cat(logits), torch.cat(labels)
    return {
        "top1": topk_accuracy(z, y, 1),
        "top5": topk_accuracy(z, y, 5) if num_classes > 5 else None,
        "n_val": len(y),
    }
