"""DeepSpeed ZeRO: engine config and construction, learning rate, momentum encoders, checkpoints.

This module and :mod:`ssl_dist.dist.collectives` are the only places that import DeepSpeed or
``torch.distributed``. DeepSpeed itself is imported lazily inside the functions that need it (its
import takes seconds and logs), so :func:`deepspeed_config` stays cheap and importable anywhere.

Training-loop contract (every rank runs the same calls)::

    engine = build_engine(method, cfg.zero, cfg.optim, micro_batch, world_size, lr)
    for step in range(total_steps):                     # optimizer steps
        set_lr(engine, lr_at(step, total_steps, peak, warmup, min_ratio))
        for _ in range(cfg.optim.grad_accum):           # micro-batches
            loss, metrics = engine(x1, x2)
            engine.backward(loss)                        # scales by 1 / grad_accum
            engine.step()                                # steps only at the boundary
        momentum_update(engine.module, step + 1, total_steps)
    save(engine, directory, {"step": step + 1})          # every rank, each writes its shard
    state = consolidated_state_dict(engine)              # every rank; dict on rank 0, else None

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
  no-op or is silently lost; :func:`momentum_update` / :func:`ema_update_zero` gather first.
* Precision on the CPU accelerator: it reports bf16 always and fp16 where oneDNN has fp16
  kernels; :func:`build_engine` refuses what it does not report. bf16 trains (ZeRO 2 is tested
  against fp32 to bf16 accuracy; stages 0 and 3 were tried by hand). fp16 builds and steps, but
  its dynamic loss scale starts at 2**16 and skips overflowing steps, so it is not validated
  here. Under bf16 / fp16 the whole module, momentum encoder included, is cast to 16 bit: EMA
  updates with ``m`` close to 1 then lose most of their increment to rounding. Use fp32 on CPU.
* DeepSpeed only resumes a ZeRO 1-3 checkpoint with the number of ranks that wrote it (stages
  1-2 raise, stage 3 fails on tensor sizes); stage-0 checkpoints load at any size.
  ``load(..., reshard=True)`` re-partitions a ZeRO 1-3 checkpoint for another world size (see
  :func:`load_resharded`); without it :func:`load` refuses with a clear error.
* DeepSpeed's own way to change the world size, the universal checkpoint (``ds_to_universal``
  then ``checkpoint.load_universal``), does not fit here: its converter only knows Adam's
  ``exp_avg`` / ``exp_avg_sq`` (KeyError on SGD's ``momentum_buffer``), and its loader restores
  only the optimizer's parameters, so frozen parameters (the momentum encoder) and buffers (the
  MoCo queue, BN statistics) would be lost. :func:`load_resharded` reads the per-rank files
  directly instead, for any element-wise optimizer state.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_dist.config import OptimConfig, ZeroConfig
from ssl_dist.models import ema_update
from ssl_dist.optim import build_optimizer, param_groups

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

CLIENT_STATE_KEY = "ssl_dist"
"""Key under which :func:`save` nests the caller's ``client_state`` in DeepSpeed's model-states
file (DeepSpeed returns its own bookkeeping keys alongside the caller's on load)."""

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
        always written (DeepSpeed's own default is 1.0, not off); ``bf16`` / ``fp16`` blocks per
        precision (fp16 with dynamic loss scaling); ``zero_allow_untested_optimizer`` since LARS
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
    if zero.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif zero.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
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


def _check_precision(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    name = accel.device_name()
    if precision == "bf16" and not accel.is_bf16_supported():
        raise ValueError(f"zero.precision=bf16 is not supported on this {name} device; use fp32")
    if precision == "fp16" and not accel.is_fp16_supported():
        raise ValueError(f"zero.precision=fp16 is not supported on this {name} device; use fp32")


def _ensure_local_rank() -> None:
    # DeepSpeedEngine reads os.environ["LOCAL_RANK"] (KeyError without it). Ray Train and
    # torchrun set it; a hand-made group (the test harness) does not. Derive it from the ranks
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

    A torch.distributed group must already exist (Ray Train's TorchConfig, or the test
    harness): DeepSpeed then wraps it (``deepspeed.comm`` sees ``torch.distributed`` initialised
    and builds its TorchBackend on the default group) and never starts its own or looks for MPI;
    ``dist_init_required=False`` makes that an assertion. ``LOCAL_RANK`` is set from the hosts
    of the ranks when the launcher did not set it.

    First use on a machine: DeepSpeed's CPU TorchBackend JIT-compiles its shared-memory
    all-reduce op (``deepspeed_shm_comm``, about 80 s on 2 cores, needs g++ and ninja), cached
    under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). That op only runs
    when ``LOCAL_SIZE`` equals the world size; otherwise collectives go through gloo.

    Args:
        model: The method (all its networks); moved and cast by DeepSpeed.
        zero: ZeRO stage, precision, offload.
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
    _check_precision(zero.precision)
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


def get_lr(engine: DeepSpeedEngine) -> list[float]:
    """Learning rate of each parameter group."""
    optimizer = engine.optimizer
    if optimizer is None:
        raise RuntimeError("the engine has no optimizer")
    return [float(g["lr"]) for g in optimizer.param_groups]


def _unique(params: Iterable[nn.Parameter], exclude: set[int] | None = None) -> list[nn.Parameter]:
    seen = set(exclude or ())
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def is_partitioned(param: Tensor) -> bool:
    """True for a ZeRO-3 parameter (whose ``data`` is not the full tensor outside forward)."""
    return hasattr(param, "ds_id")


@contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3 parameters whole inside the block; a no-op under stages 0-2.

    ``deepspeed.zero.GatheredParameters``: every rank must enter with the same parameters.

    Args:
        params: Parameters to gather (duplicates are dropped).
        modifier_rank: ``None`` for read-only use (changes are discarded when the block ends:
            the partitions are kept as they were). A rank to keep changes: on exit that rank's
            full tensors are broadcast and re-partitioned, so every rank should compute the same
            update.
    """
    plist = _unique(params)
    if not any(is_partitioned(p) for p in plist):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(plist, modifier_rank=modifier_rank):
        yield


@contextmanager
def _gathered_for_ema(
    target: Iterable[nn.Parameter], online: Iterable[nn.Parameter]
) -> Iterator[None]:
    targets = _unique(target)
    onlines = _unique(online, exclude={id(p) for p in targets})
    # Online weights are read only (their fp32 master copy lives in the optimizer and must not
    # be overwritten); the momentum weights are written by every rank identically and kept from
    # rank 0, which also refreshes both their partitions and any persistent full copies.
    with gathered(onlines, modifier_rank=None), gathered(targets, modifier_rank=0):
        yield


def ema_update_zero(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """:func:`ssl_dist.models.ema_update` that is correct under every ZeRO stage.

    Under ZeRO-3 both modules are gathered for the update (one all-gather of each and a
    broadcast of ``target``), then re-partitioned. Every rank must call it.
    """
    with _gathered_for_ema(target.parameters(), online.parameters()):
        ema_update(target, online, momentum)


def momentum_update(module: HasMomentumEncoder, step: int, total_steps: int) -> float:
    """``module.momentum_update(step, total_steps)`` with ZeRO-3 parameters gathered.

    ``module`` is ``engine.module`` (the method). Every rank must call it, after the optimizer
    step. Returns the momentum used.
    """
    pairs = module.momentum_pairs()
    targets = [p for t, _ in pairs for p in t.parameters()]
    onlines = [p for _, o in pairs for p in o.parameters()]
    with _gathered_for_ema(targets, onlines):
        return float(module.momentum_update(step, total_steps))


def _checkpoint_dir(directory: str | Path, tag: str | None) -> tuple[Path, str]:
    root = Path(directory)
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {root} (no 'latest' file)")
        tag = latest.read_text().strip()
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {root}")
    return root, tag


def _model_states(ckpt: Path) -> dict[str, Any]:
    # Stages 0-2: one mp_rank_00_model_states.pt; stage 3: one per rank, zero_pp_rank_0_... first.
    files = sorted(ckpt.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model-states file")
    # weights_only=False: DeepSpeed pickles its own objects in here (see load()).
    states: dict[str, Any] = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    return states


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
            this one (:func:`load_resharded`) instead of refused.

    Returns:
        The ``client_state`` given to :func:`save`.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: a ZeRO checkpoint saved by a different number of ranks and ``reshard`` is
            off (DeepSpeed cannot re-partition the optimizer state: stages 1-2 raise a
            ZeRORuntimeException, stage 3 fails with a tensor-size mismatch). Stage-0
            checkpoints load at any world size.
    """
    root, name = _checkpoint_dir(directory, tag)
    saved = _model_states(root / name).get("dp_world_size")
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
    come back as float32 CPU tensors: the fp32 master weights where DeepSpeed keeps a separate
    copy (ZeRO 1-3 under bf16 / fp16), else the module's weights upcast (fp32 training: they are
    the master weights; frozen parameters; stage 0 under bf16 / fp16). Buffers keep their
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


def state_dict_from_checkpoint(directory: str | Path, tag: str | None = None) -> dict[str, Tensor]:
    """The fp32 state dict of a checkpoint written by :func:`save`, without an engine or group.

    ZeRO 1-3: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (merges the per-rank
    fp32 optimizer shards, buffers and, under stage 3, frozen parameters); frozen parameters
    under stages 1-2 and everything under stage 0 come from the ``module`` entry of the
    model-states file. Same trust boundary as :func:`load`.
    """
    root, tag = _checkpoint_dir(directory, tag)
    ckpt = root / tag
    states = _model_states(ckpt)
    module: dict[str, Tensor] = dict(states.get("module") or {})
    sd: dict[str, Tensor] = {}
    if any(ckpt.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))
    # Stage 0 keeps everything in "module". Stages 1-2 keep frozen parameters only there
    # (DeepSpeed's merge skips them); under stage 3 its entries are empty partitioned
    # placeholders and the merge has everything.
    for key, value in module.items():
        if key not in sd and value.numel() > 0:
            sd[key] = value
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# --- Re-sharding a ZeRO 1-3 checkpoint for another world size -------------------------------
#
# What DeepSpeed 0.19 writes per rank r (``zero_pp_rank_{r}_mp_rank_00_optim_states.pt``,
# ``bf16_`` prefixed under bf16), under ``optimizer_state_dict``:
#   stages 1-2: ``base_optimizer_state`` (the torch optimizer's state_dict: one flat tensor per
#     param group, padded to the partition size) and ``param_slice_mappings`` (per group:
#     parameter name -> (start, numel) of its fragment in rank r's flat partition). A
#     parameter's elements lie in consecutive ranks, so its fragments in rank order are the
#     parameter, flattened.
#   stage 3: ``optimizer_state_dict`` (one flat tensor per sub-group) and, in each rank's
#     model-states file, ``param_shapes`` (per sub-group, in flat order). Every rank holds
#     ceil(numel / W) elements of every parameter, one after the other; rank r's slice of a
#     parameter is elements [r * ceil, (r + 1) * ceil) of it, zero-padded at the end.
# The live engine is laid out the same way (``_Piece`` below); both sides go through the
# parameter's full flattened tensor, so the old and new world sizes are independent.

_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass(frozen=True)
class _Piece:
    """The elements of one trainable parameter that this rank's flat fp32 partition holds."""

    name: str
    flat: Tensor
    """This rank's flat fp32 partition of the parameter's (sub-)group (the optimizer's param)."""
    flat_start: int
    full_start: int
    """Offset of the piece in the flattened full parameter."""
    length: int


def _zero_optimizer(engine: DeepSpeedEngine) -> Any:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if engine.fp16_enabled() or not isinstance(
        opt, DeepSpeedZeroOptimizer | DeepSpeedZeroOptimizer_Stage3
    ):
        raise ValueError(
            f"re-sharding supports DeepSpeed's ZeRO 1-3 optimizers under fp32 or bf16, not "
            f"{type(opt).__name__}{' under fp16' if engine.fp16_enabled() else ''}"
        )
    if getattr(opt, "swap_optimizer", False):
        raise ValueError("re-sharding does not support NVMe-offloaded optimizer state")
    return opt


def _flat_groups(engine: DeepSpeedEngine) -> list[tuple[Tensor, list[nn.Parameter]]]:
    """Per (sub-)group: this rank's flat fp32 partition and the group's trainable parameters."""
    opt = _zero_optimizer(engine)
    if engine.zero_optimization_stage() == 3:
        return list(zip(opt.fp32_partitioned_groups_flat, opt.fp16_groups, strict=True))
    return list(zip(opt.single_partition_of_fp32_groups, opt.bit16_groups, strict=True))


def _pieces(engine: DeepSpeedEngine, names: Mapping[int, str]) -> list[_Piece]:
    opt = _zero_optimizer(engine)
    stage3 = engine.zero_optimization_stage() == 3
    rank = dist.get_rank(group=opt.dp_process_group)
    out = []
    for flat, params in _flat_groups(engine):
        for p in params:
            if stage3:
                _, start, per_rank = opt.grad_position[opt.get_param_id(p)]
                full_start = rank * per_rank
                length = max(0, min(per_rank, getattr(p, "ds_numel", 0) - full_start))
                if length:
                    out.append(_Piece(names[id(p)], flat, start, full_start, length))
            elif (mapping := getattr(p, "_hp_mapping", None)) is not None:
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                out.append(_Piece(names[id(p)], flat, hp.start, lp.start, lp.numel))
    return out


def _is_partitioned_state(value: Any) -> bool:
    """Element-wise optimizer state (momentum, Adam moments) versus per-group scalars (step)."""
    return isinstance(value, Tensor) and value.dim() > 0


def _group_states(optimizer_state: Any) -> list[dict[str, Any]]:
    """The state of each flat (sub-)group, in order, from a torch state_dict (or the lean list
    that ZeRO 1-2 write with ``elastic_checkpoint``)."""
    if isinstance(optimizer_state, list):
        return [dict(s) for s in optimizer_state]
    state = optimizer_state["state"]
    return [dict(state.get(i, {})) for g in optimizer_state["param_groups"] for i in g["params"]]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.equal(a, b)
    return bool(a == b)


def _saved_optimizer_state(
    ckpt: Path,
) -> tuple[int, dict[str, dict[str, Tensor]], dict[str, dict[str, Any]]]:
    """Consolidate a checkpoint's ZeRO optimizer state per parameter, whatever its world size.

    Returns ``(stage, tensors, scalars)``: ``tensors[name][key]`` is the full flattened state
    ``key`` (e.g. ``momentum_buffer``, ``exp_avg``) of trainable parameter ``name``;
    ``scalars[name][key]`` the per-group values (e.g. AdamW's ``step``) of its group.
    """
    found: dict[int, Path] = {}
    for f in ckpt.iterdir():
        m = _OPTIM_FILE.match(f.name)
        if m:
            found[int(m.group(1))] = f
    world = len(found)
    if not world or sorted(found) != list(range(world)):
        raise FileNotFoundError(f"{ckpt} holds no complete set of ZeRO optimizer files")
    shapes: list[Mapping[str, Any]] = []
    pieces: dict[str, dict[str, list[Tensor]]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    stage = 0

    def add(name: str, state: Mapping[str, Any], start: int, length: int) -> None:
        mine = scalars.setdefault(name, {})
        for key, value in state.items():
            if _is_partitioned_state(value):
                pieces.setdefault(name, {}).setdefault(key, []).append(
                    value.narrow(0, start, length)
                )
            elif key in mine and not _same(mine[key], value):
                raise ValueError(f"optimizer state {key!r} of {name} differs between ranks")
            else:
                mine[key] = value

    for rank in range(world):
        # weights_only=False: DeepSpeed pickles its own objects in here (see load()).
        osd = torch.load(found[rank], map_location="cpu", weights_only=False, mmap=True)
        osd = osd["optimizer_state_dict"]
        stage = int(osd["zero_stage"])
        if stage == 3:
            if not shapes:
                shapes = _model_states(ckpt)["param_shapes"]
            groups = _group_states(osd["optimizer_state_dict"])
            if len(groups) != len(shapes):
                raise ValueError(f"{ckpt}: {len(groups)} optimizer groups, {len(shapes)} shapes")
            for state, group_shapes in zip(groups, shapes, strict=True):
                offset = 0
                for name, shape in group_shapes.items():
                    numel = math.prod(shape)
                    per_rank = -(-numel // world)
                    add(name, state, offset, max(0, min(per_rank, numel - rank * per_rank)))
                    offset += per_rank
        else:
            groups = _group_states(osd["base_optimizer_state"])
            for state, mapping in zip(groups, osd["param_slice_mappings"], strict=True):
                for name, address in mapping.items():
                    add(name, state, address.start, address.numel)
    tensors = {n: {k: torch.cat(v) for k, v in keys.items()} for n, keys in pieces.items()}
    return stage, tensors, scalars


def _load_module_state(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy a full state dict into the module in place, gathering ZeRO-3 parameters (every
    rank must call it with the same values)."""
    missing: list[str] = []

    def copy(target: Tensor, key: str) -> None:
        if key not in state:
            missing.append(key)
            return
        with torch.no_grad():
            target.copy_(state[key].reshape(target.shape))

    def walk(mod: nn.Module, prefix: str) -> None:
        own = list(mod.parameters(recurse=False))
        with gathered(own, modifier_rank=0):
            for name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
                copy(p.data, prefix + name)
        for name, b in mod.named_buffers(recurse=False, remove_duplicate=False):
            if name not in mod._non_persistent_buffers_set:
                copy(b.data, prefix + name)
        for name, child in mod.named_children():
            walk(child, f"{prefix}{name}.")

    walk(module, "")
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} module entries: {missing[:5]}")


RESHARD_TESTED_DEEPSPEED = "0.19"
"""The DeepSpeed minor series whose ZeRO partition internals :func:`load_resharded` reads and
``tests/dist/test_zero_reshard.py`` checks; pyproject.toml pins deepspeed to it."""


def check_reshard_support(version: str) -> None:
    """Refuse to re-shard with a DeepSpeed outside the tested minor series: the private
    attributes read here change between minor releases, and a silent misread would corrupt the
    optimizer state rather than fail.

    Raises:
        RuntimeError: `version` is not ``RESHARD_TESTED_DEEPSPEED.*``.
    """
    if version.split("+")[0].split(".")[:2] != RESHARD_TESTED_DEEPSPEED.split("."):
        raise RuntimeError(
            f"resuming a ZeRO 1-3 checkpoint at another world size re-partitions DeepSpeed's "
            f"optimizer state through its internals, tested on deepspeed "
            f"{RESHARD_TESTED_DEEPSPEED}.x; this is deepspeed {version}. Install the tested "
            f"series (pip install -c constraints.txt -e .), or resume with the number of "
            f"workers that wrote the checkpoint"
        )


def load_resharded(engine: DeepSpeedEngine, directory: str | Path, tag: str | None = None) -> dict:
    """:func:`load` for a ZeRO 1-3 checkpoint written by any number of ranks.

    Every rank reads every rank's files (memory-mapped) and rebuilds, per parameter, the full
    fp32 master weights and the full element-wise optimizer state; it then keeps the slices
    that its partition in ``engine`` owns. Module weights, frozen parameters (momentum
    encoders) and buffers (the MoCo queue, BN statistics) come from
    :func:`state_dict_from_checkpoint`; DeepSpeed's step counters and the client state from the
    model-states file. Exact: values are copied, never recomputed. Works for any world size,
    including the one that wrote the checkpoint. Relies on the partition layout of DeepSpeed's
    ZeRO optimizers (the attributes its universal checkpoint uses too), checked against 0.19.8
    by ``tests/dist/test_zero_reshard.py``.

    Every rank must call it. Same trust boundary as :func:`load`.

    Raises:
        ValueError: fp16 (its loss-scaler state is not carried), a stage-3 checkpoint into a
            stage-1/2 engine or the reverse, or state that does not fit the engine's model.
        RuntimeError: a DeepSpeed release outside the tested series
            (:func:`check_reshard_support`).
    """
    import deepspeed

    check_reshard_support(deepspeed.__version__)
    root, name = _checkpoint_dir(directory, tag)
    ckpt = root / name
    opt = _zero_optimizer(engine)
    saved_stage, tensors, scalars = _saved_optimizer_state(ckpt)
    if (saved_stage == 3) != (engine.zero_optimization_stage() == 3):
        raise ValueError(
            f"checkpoint {name!r} was written under ZeRO-{saved_stage}; this engine runs "
            f"ZeRO-{engine.zero_optimization_stage()}"
        )
    full = state_dict_from_checkpoint(root, name)
    _load_module_state(engine.module, full)

    names = {id(p): n for n, p in engine.module.named_parameters()}
    base = opt.optimizer
    with torch.no_grad():  # the flat fp32 partitions are leaves that require grad
        for flat, params in _flat_groups(engine):
            state = base.state[flat]
            state.clear()
            for key in sorted({k for p in params for k in tensors.get(names[id(p)], {})}):
                state[key] = torch.zeros_like(flat)
            group = [scalars[names[id(p)]] for p in params if names[id(p)] in scalars]
            for key, value in (group[0] if group else {}).items():
                state[key] = value.clone() if isinstance(value, Tensor) else value
        for piece in _pieces(engine, names):
            numel = math.prod(full[piece.name].shape)
            for key, src in [
                ("", full[piece.name].reshape(-1)),
                *tensors.get(piece.name, {}).items(),
            ]:
                if src.numel() != numel:
                    raise ValueError(f"{piece.name}: saved {key or 'weights'} has {src.numel()} "
                                     f"elements, the parameter {numel}")  # fmt: skip
                dst = piece.flat if not key else base.state[piece.flat][key]
                dst.narrow(0, piece.flat_start, piece.length).copy_(
                    src.narrow(0, piece.full_start, piece.length)
                )
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False  # ZeRO 1-2: re-link fragments to the new state

    states = _model_states(ckpt)
    engine.global_steps = int(states["global_steps"])
    engine.global_samples = int(states.get("global_samples", 0))
    engine.skipped_steps = int(states.get("skipped_steps", 0))
    return dict(states.get(CLIENT_STATE_KEY) or {})


def consolidated_optimizer_state(engine: DeepSpeedEngine) -> dict[str, dict[str, Tensor]] | None:
    """The optimizer state per trainable parameter, whole, on rank 0 (``None`` elsewhere).

    ``{name: {key: tensor}}``: element-wise state (``momentum_buffer``, ``exp_avg``...) in the
    parameter's shape (float32, CPU), per-group scalars (AdamW's ``step``) as they are. A view
    independent of the world size, to compare runs; every rank must call it (one all-reduce per
    state key under ZeRO 1-3). Stage 0 reads the client optimizer directly.
    """
    module: nn.Module = engine.module
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    rank0 = dist.get_rank() == 0

    def copy(value: Any) -> Any:
        return value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else value

    if engine.zero_optimization_stage() == 0:
        if not rank0:
            return None
        state = engine.optimizer.state
        return {n: {k: copy(v) for k, v in state[p].items()} for n, p in trainable}
    base = _zero_optimizer(engine).optimizer
    names = {id(p): n for n, p in trainable}
    groups = _flat_groups(engine)
    local = {k for flat, _ in groups for k, v in base.state[flat].items()
             if _is_partitioned_state(v)}  # fmt: skip
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(local))
    keys = sorted({k for ks in every for k in ks})
    sizes = {n: getattr(p, "ds_numel", p.numel()) for n, p in trainable}
    offsets, total = {}, 0
    for n, size in sizes.items():
        offsets[n], total = total, total + size
    out: dict[str, dict[str, Tensor]] = {n: {} for n in sizes}
    pieces = _pieces(engine, names)
    for key in keys:
        buf = torch.zeros(total, dtype=torch.float32, device=groups[0][0].device)
        for piece in pieces:
            src = base.state[piece.flat].get(key)
            if src is not None:
                start = offsets[piece.name] + piece.full_start
                buf.narrow(0, start, piece.length).copy_(
                    src.narrow(0, piece.flat_start, piece.length)
                )
        dist.all_reduce(buf)  # every element is owned by exactly one rank
        if rank0:
            for n, p in trainable:
                shape = getattr(p, "ds_shape", p.shape)
                out[n][key] = buf.narrow(0, offsets[n], sizes[n]).reshape(shape).cpu().clone()
    if not rank0:
        return None
    for flat, params in groups:
        scalars = {k: v for k, v in base.state[flat].items() if not _is_partitioned_state(v)}
        for p in params:
            out[names[id(p)]].update({k: copy(v) for k, v in scalars.items()})
    return out


def state_bytes(engine: DeepSpeedEngine) -> int:
    """Bytes of parameters and optimizer state this rank holds (each storage counted once).

    Counts the module's parameters (this rank's partition under ZeRO-3), the tensors the base
    optimizer updates (fp32 master partitions under ZeRO 1-3, the parameters under stage 0) and
    its state (e.g. momentum buffers). Gradients are transient and left out.
    """
    seen: dict[int, int] = {}

    def add(t: Tensor | None) -> None:
        if isinstance(t, Tensor) and t.numel() > 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", None) if is_partitioned(p) else p.data)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in base.param_groups:
        for p in group["params"]:
            add(p.data)
    for state in base.state.values():
        for v in state.values():
            add(v)
    return sum(seen.values())


def zero_formula_bytes(module: nn.Module, stage: int, world_size: int) -> int:
    """The ZeRO paper's accounting (Rajbhandari et al. 2020, sec. 5) for fp32 SGD with momentum:
    4 bytes per parameter, plus 8 per trainable one (fp32 master copy under ZeRO and momentum;
    stage 0 updates the parameters in place, so 4). Stages 1-2 partition the optimizer part,
    stage 3 the parameters too."""
    # Under ZeRO-3 a parameter's local tensor is empty; ds_numel holds its full size.
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in module.parameters()]
    total = sum(n for n, _ in sizes)
    trainable = sum(n for n, grad in sizes if grad)
    if stage == 0:
        return 4 * total + 4 * trainable
    if stage in (1, 2):
        return 4 * total + 8 * trainable // world_size
    return (4 * total + 8 * trainable) // world_size
