"""DeepSpeed ZeRO: engine config and construction, learning rate, gathering ZeRO-3 parameters
for momentum encoders, and the save / load entry points of checkpoints.

Beside it in :mod:`ssl_dist.dist` (the only package that imports DeepSpeed or
``torch.distributed``): :mod:`~ssl_dist.dist.checkpoint_files` reads a checkpoint's files
without an engine, :mod:`~ssl_dist.dist.reshard` resumes one at another world size, and
:mod:`~ssl_dist.dist.memory` accounts for what a rank holds. DeepSpeed itself is imported lazily
inside the functions that need it (its import takes seconds and logs), so
:func:`deepspeed_config` stays cheap and importable anywhere.

Every rank makes the same calls in the same order: :func:`build_engine`, then per micro-batch
the engine's forward, ``engine.backward`` (scales by 1 / grad_accum) and ``engine.step`` (steps
at the accumulation boundary), :func:`set_lr` and :func:`momentum_update` per optimizer step,
:func:`save` and :func:`consolidated_state_dict` at a checkpoint; the one loop that does so is
``ssl_dist.train.runtime.run_steps`` (its ``DeepSpeedBackend``).

What was checked against DeepSpeed 0.19 on its CPU accelerator (gloo), in
``tests/dist/test_zero.py``:

* Gradients are averaged over ranks, so with a per-sample-mean loss a step equals a plain torch
  step on the concatenated global batch, under ZeRO stages 0-3 (also with gradient accumulation
  and optimizer offload), to float32 round-off.
* DeepSpeed CLIPS GRADIENTS TO NORM 1.0 UNLESS TOLD OTHERWISE (``gradient_clipping`` defaults to
  1.0), so :func:`deepspeed_config` always writes ``optim.grad_clip`` (0 disables).
* LARS (layer-wise trust ratio) is only correct without ZeRO partitioning: stages 1-3 hand the
  client optimizer flat per-group shards, so "the layer" whose norm LARS takes becomes a slice of
  many layers. :func:`build_engine` refuses LARS with stage >= 1 (SGD / AdamW are element-wise and
  fine under every stage).
* ZeRO-3 partitions EVERY parameter of the module, the frozen (``requires_grad=False``) momentum
  encoder included: outside forward its ``p.data`` is empty (or, for small "persistent"
  parameters, a full copy that the partition does not follow). A plain in-place EMA is then a
  no-op or is silently lost; :func:`momentum_update` gathers first.
* Precision: bf16 is DeepSpeed's ``torch_autocast`` (``torch.autocast`` around the module's
  forward, inside the engine), NOT its ``bf16`` mode. The ``bf16`` mode casts the whole module,
  momentum encoder included, to bf16, where an EMA step at ``m = 0.999`` is below the weights'
  resolution; under autocast the module, its gradients, the optimizer state and the momentum
  encoder stay float32 (``tests/dist/test_zero.py`` checks the EMA against an fp32 reference
  under ZeRO 0, 2 and 3). An autocast that the caller opens outside the engine is switched off
  by DeepSpeed's forward, so the engine's own setting is the only one. Its
  ``lower_precision_safe_modules`` is empty: gradients are reduced and ZeRO-3 parameters
  gathered in float32 (bf16 communication would halve those bytes, and round the gathered
  momentum weights). The loss and metrics turn autocast off (:mod:`ssl_dist.losses`).
* DeepSpeed only resumes a ZeRO 1-3 checkpoint with the number of ranks that wrote it (stages
  1-2 raise, stage 3 fails on tensor sizes); stage-0 checkpoints load at any size.
  ``load(..., reshard=True)`` re-partitions a ZeRO 1-3 checkpoint for another world size
  (:func:`ssl_dist.dist.reshard.load_resharded`, checked in ``tests/dist/test_zero_reshard.py``);
  without it :func:`load` refuses with a clear error.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_dist.config import OptimConfig, ZeroConfig
from ssl_dist.dist.checkpoint_files import CLIENT_STATE_KEY, checkpoint_dir, model_states
from ssl_dist.dist.gather import _unique, gathered
from ssl_dist.dist.reshard import load_resharded
from ssl_dist.optim import build_optimizer, param_groups
from ssl_dist.precision import resolve as resolve_precision

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

STEPS_PER_PRINT = 2**31 - 1
"""DeepSpeed's periodic step log is effectively disabled; the trainer logs its own metrics."""


class HasMomentumEncoder(Protocol):
    """What :func:`momentum_update` needs from a method (see ``ssl_dist.methods.base``)."""

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]: ...

    def momentum_update(self, step: int, total_steps: int) -> float: ...


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_config(
    zero: ZeroConfig,
    optim: OptimConfig,
    micro_batch: int,
    world_size: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for one run.

    Args:
        zero: Stage, precision and optimizer offload.
        optim: ``grad_accum`` and ``grad_clip`` are used (the optimizer itself is a client
            optimizer, see :func:`build_engine`).
        micro_batch: Samples per rank per micro-batch (``DataConfig.batch_size``).
        world_size: Data-parallel ranks.
        extra: Keys merged recursively over the result, e.g.
            ``{"zero_optimization": {"stage3_param_persistence_threshold": 0}}``.

    Returns:
        ``train_batch_size = micro_batch * grad_accum * world_size``; ``gradient_clipping`` is
        always written (DeepSpeed's own default is 1.0, not off); under bf16 a ``torch_autocast``
        block (see the module docstring; ``zero.precision`` must be resolved, not ``auto``);
        ``zero_allow_untested_optimizer`` since LARS
        and the torch optimizers are client optimizers; with ``offload_optimizer`` the optimizer
        state lives in CPU memory and ``zero_force_ds_cpu_optimizer`` is off so that a client
        optimizer is accepted.
    """
    if micro_batch < 1 or world_size < 1:
        raise ValueError(
            f"micro_batch and world_size must be at least 1, got {micro_batch} and {world_size}"
        )
    if zero.offload_optimizer and zero.stage == 0:
        raise ValueError("zero.offload_optimizer needs ZeRO stage 1, 2 or 3 (got stage 0)")
    zero_opt: dict[str, Any] = {"stage": zero.stage}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": micro_batch * optim.grad_accum * world_size,
        "gradient_clipping": float(optim.grad_clip),
        "zero_optimization": zero_opt,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if zero.offload_optimizer:
        zero_opt["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if zero.precision == "auto":
        raise ValueError("zero.precision=auto must be resolved first (ssl_dist.precision.resolve)")
    if zero.precision == "bf16":
        cfg["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
    return _merge(cfg, extra) if extra else cfg


def check_supported(zero: ZeroConfig, optim: OptimConfig) -> None:
    """Raise ``ValueError`` for combinations that would train silently wrong.

    LARS under ZeRO stage >= 1 (see the module docstring). Needs no process group;
    :func:`build_engine` calls it first.
    """
    if optim.name == "lars" and zero.stage > 0:
        raise ValueError(
            f"optim.name=lars needs zero.stage=0 (got {zero.stage}): ZeRO stages 1-3 give the "
            "optimizer flat shards of many layers, so LARS's per-layer trust ratio would be "
            "computed over the wrong tensors; use sgd/adamw with ZeRO, or stage 0 with lars"
        )


def _resolved(zero: ZeroConfig, model: nn.Module) -> ZeroConfig:
    """`zero` with its precision resolved for the device of `model`'s parameters."""
    from deepspeed.accelerator import get_accelerator

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    used = resolve_precision(zero.precision, device)
    accel = get_accelerator()
    if used == "bf16" and not accel.is_bf16_supported():
        name = accel.device_name()
        raise ValueError(f"zero.precision=bf16 is not supported on this {name} device; use fp32")
    return zero.model_copy(update={"precision": used})


def _ensure_local_rank() -> None:
    # DeepSpeedEngine reads os.environ["LOCAL_RANK"] (KeyError without it). Ray Train and
    # torchrun set it; a group from ssl_dist.dist.spawn does not. Derive it from the ranks
    # on this host (a collective: every rank gets here from build_engine).
    if "LOCAL_RANK" in os.environ:
        return
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    me = dist.get_rank()
    os.environ["LOCAL_RANK"] = str(sum(1 for r in range(me) if hosts[r] == hosts[me]))


def build_engine(
    model: nn.Module,
    zero: ZeroConfig,
    optim: OptimConfig,
    micro_batch: int,
    world_size: int,
    lr: float,
    extra: Mapping[str, Any] | None = None,
) -> DeepSpeedEngine:
    """Wrap ``model`` in a DeepSpeed engine on the existing process group.

    The client optimizer is ``build_optimizer(param_groups(model, wd), optim, lr)``:
    ``param_groups`` keeps only ``requires_grad`` parameters, so momentum encoders stay out of
    the optimizer (DeepSpeed then leaves them to the caller; ZeRO-3 still partitions them).

    A torch.distributed group must already exist (Ray Train's TorchConfig, or
    :func:`ssl_dist.dist.spawn.run_world`): DeepSpeed then wraps it (``deepspeed.comm`` sees
    ``torch.distributed`` initialised and builds its TorchBackend on the default group) and
    never starts its own or looks for MPI; ``dist_init_required=False`` makes that an
    assertion. ``LOCAL_RANK`` is set from the hosts of the ranks when the launcher did not set
    it.

    First use on a machine: DeepSpeed's CPU TorchBackend JIT-compiles its shared-memory
    all-reduce op (``deepspeed_shm_comm``, about 80 s on 2 cores, needs g++ and ninja), cached
    under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). That op only runs
    when ``LOCAL_SIZE`` equals the world size; otherwise collectives go through gloo.

    Args:
        model: The method (all its networks), on its device; its weights stay float32.
        zero: ZeRO stage, precision (``auto`` resolved for the model's device), offload.
        optim: Optimizer config.
        micro_batch: Samples per rank per micro-batch.
        world_size: Expected number of ranks (checked against the group).
        lr: Initial learning rate (:func:`set_lr` overrides it every step).
        extra: Merged into the DeepSpeed config (see :func:`deepspeed_config`).

    Raises:
        ValueError: LARS with ZeRO >= 1, an unsupported precision, or a world size that does not
            match the process group.
        RuntimeError: no process group.
    """
    check_supported(zero, optim)
    zero = _resolved(zero, model)
    config = deepspeed_config(zero, optim, micro_batch, world_size, extra)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "build_engine needs an initialised torch.distributed process group (Ray Train "
            "creates one per worker group); DeepSpeed is not allowed to start its own"
        )
    if dist.get_world_size() != world_size:
        raise ValueError(
            f"world_size={world_size} but the process group has {dist.get_world_size()} ranks"
        )
    import deepspeed

    _ensure_local_rank()
    optimizer = build_optimizer(param_groups(model, optim.weight_decay), optim, lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    return engine


def set_lr(engine: DeepSpeedEngine, lr: float) -> None:
    """Set the learning rate of every parameter group for the next optimizer step.

    ``engine.optimizer`` is the client optimizer (stage 0, fp32) or DeepSpeed's wrapper, whose
    ``param_groups`` are the client optimizer's own groups (the tests check that the value set
    here is the one the step uses, under every stage).
    """
    optimizer = engine.optimizer
    if optimizer is None:
        raise RuntimeError("the engine has no optimizer")
    for group in optimizer.param_groups:
        group["lr"] = lr


def momentum_update(module: HasMomentumEncoder, step: int, total_steps: int) -> float:
    """``module.momentum_update(step, total_steps)`` with ZeRO-3 parameters gathered.

    ``module`` is ``engine.module`` (the method). Every rank must call it, after the optimizer
    step. Under ZeRO-3 the online and momentum weights are gathered for the update (one
    all-gather of each and a broadcast of the momentum weights), then re-partitioned. Returns
    the momentum used.
    """
    pairs = module.momentum_pairs()
    targets = _unique(p for t, _ in pairs for p in t.parameters())
    onlines = _unique(
        (p for _, o in pairs for p in o.parameters()), exclude={id(p) for p in targets}
    )
    # Online weights are read only (their fp32 master copy lives in the optimizer and must not
    # be overwritten); the momentum weights are written by every rank identically and kept from
    # rank 0, which also refreshes both their partitions and any persistent full copies.
    with gathered(onlines, modifier_rank=None), gathered(targets, modifier_rank=0):
        return float(module.momentum_update(step, total_steps))


def save(
    engine: DeepSpeedEngine,
    directory: str | Path,
    client_state: Mapping[str, Any],
    tag: str | None = None,
) -> str:
    """Write a DeepSpeed checkpoint; every rank must call it (each writes its own shards).

    Args:
        engine: The engine.
        directory: Checkpoint root; the checkpoint goes to ``directory/tag`` and
            ``directory/latest`` names it.
        client_state: Picklable trainer state (step, data position, RNG...), returned by
            :func:`load`.
        tag: Sub-directory name, default ``step{global_steps}``.

    Returns:
        The tag.
    """
    tag = tag or f"step{engine.global_steps}"
    ok = engine.save_checkpoint(
        str(directory), tag=tag, client_state={CLIENT_STATE_KEY: dict(client_state)}
    )
    if ok is False:
        raise RuntimeError(f"DeepSpeed could not save the checkpoint {tag!r} in {directory}")
    return tag


def load(
    engine: DeepSpeedEngine, directory: str | Path, tag: str | None = None, reshard: bool = False
) -> dict[str, Any]:
    """Restore module, optimizer (and scheduler) state written by :func:`save`.

    Every rank must call it, with the same ZeRO stage as when it was saved and, for stages
    1-3, the same number of ranks (DeepSpeed's ZeRO shards are per rank) unless ``reshard``.

    Trust boundary: DeepSpeed reads its own files with ``torch.load(weights_only=False)`` (it
    passes that explicitly, so torch >= 2.6's safe default does not apply and no safe-globals
    list is needed), i.e. it unpickles them. Only load checkpoint directories this project
    wrote itself.

    Args:
        engine: A freshly built engine of the same model and config.
        directory: Checkpoint root given to :func:`save`.
        tag: Which checkpoint; default the one named in ``directory/latest``.
        reshard: A ZeRO 1-3 checkpoint saved by another number of ranks is re-partitioned for
            this one (:func:`ssl_dist.dist.reshard.load_resharded`) instead of refused.

    Returns:
        The ``client_state`` given to :func:`save`.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: a ZeRO checkpoint saved by a different number of ranks and ``reshard`` is
            off (DeepSpeed cannot re-partition the optimizer state: stages 1-2 raise a
            ZeRORuntimeException, stage 3 fails with a tensor-size mismatch). Stage-0
            checkpoints load at any world size.
    """
    root, name = checkpoint_dir(directory, tag)
    saved = model_states(root / name).get("dp_world_size")
    current = engine.dp_world_size
    if engine.zero_optimization_stage() > 0 and saved is not None and saved != current:
        if reshard:
            return load_resharded(engine, root, name)
        raise ValueError(
            f"checkpoint {name!r} in {root} was saved by {saved} ranks under ZeRO; it can only "
            f"be resumed by {saved} ranks, not {current} (or load it with reshard=True)"
        )
    path, state = engine.load_checkpoint(
        str(root), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {name!r} in {root}")
    return dict((state or {}).get(CLIENT_STATE_KEY, {}))


def consolidated_state_dict(engine: DeepSpeedEngine) -> dict[str, Tensor] | None:
    """The full state dict of ``engine.module`` on rank 0, ``None`` on the other ranks.

    Every rank must call it (ZeRO-3 gathers one module's own parameters at a time). Parameters
    come back as float32 CPU tensors: the module's own weights, which are the fp32 master
    weights under fp32 and under bf16 autocast alike (an engine in DeepSpeed's own 16-bit mode,
    which this project does not configure, would give its fp32 master copy). Buffers keep their
    dtype. Keys are those of ``module.state_dict()`` (shared parameters appear under each name).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module: nn.Module = engine.module
    rank0 = dist.get_rank() == 0
    mixed = bool(engine.bfloat16_enabled() or engine.fp16_enabled())
    out: dict[str, Tensor] = {}

    def walk(mod: nn.Module, prefix: str) -> None:
        own = list(mod.parameters(recurse=False))
        with gathered(own, modifier_rank=None):
            for name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
                full = safe_get_full_fp32_param(p) if mixed and p.requires_grad else None
                if full is None:
                    full = p.detach()
                if rank0:
                    out[prefix + name] = full.detach().to("cpu", torch.float32, copy=True)
        if rank0:
            for name, b in mod.named_buffers(recurse=False, remove_duplicate=False):
                if name not in mod._non_persistent_buffers_set:
                    out[prefix + name] = b.detach().to("cpu", copy=True)
        for name, child in mod.named_children():
            walk(child, f"{prefix}{name}.")

    walk(module, "")
    return out if rank0 else None
