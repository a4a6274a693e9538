"""Re-sharding: resume a ZeRO 1-3 checkpoint with another number of ranks.

DeepSpeed only resumes a ZeRO 1-3 checkpoint with the number of ranks that wrote it (stages 1-2
raise, stage 3 fails on tensor sizes); :func:`ssl_dist.dist.zero.load` with ``reshard=True``
hands such a checkpoint to :func:`load_resharded`, which re-partitions it for this world size.

DeepSpeed's own way to change the world size, the universal checkpoint (``ds_to_universal`` then
``checkpoint.load_universal``), does not fit here: its converter only knows Adam's ``exp_avg`` /
``exp_avg_sq`` (KeyError on SGD's ``momentum_buffer``), and its loader restores only the
optimizer's parameters, so frozen parameters (the momentum encoder) and buffers (the MoCo queue,
BN statistics) would be lost. :func:`load_resharded` reads the per-rank files directly instead,
for any element-wise optimizer state.

That means reading DeepSpeed's private partition layout, on disk and in a live engine. All that
re-sharding reads of it is in this module, so that a DeepSpeed upgrade is a diff here:
:data:`RESHARD_TESTED_DEEPSPEED` names the series it was checked against
(``tests/dist/test_zero_reshard.py``) and :func:`check_reshard_support` refuses any other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_dist.dist.checkpoint_files import (
    CLIENT_STATE_KEY,
    checkpoint_dir,
    model_states,
    state_dict_from_checkpoint,
)
from ssl_dist.dist.gather import gathered

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

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
    """:func:`ssl_dist.dist.zero.load` for a ZeRO 1-3 checkpoint written by any number of ranks.

    Every rank reads every rank's files (memory-mapped) and rebuilds, per parameter, the full
    fp32 master weights and the full element-wise optimizer state; it then keeps the slices
    that its partition in ``engine`` owns. Module weights, frozen parameters (momentum
    encoders) and buffers (the MoCo queue, BN statistics) come from
    :func:`state_dict_from_checkpoint`; DeepSpeed's step counters and the client state from the
    model-states file. Exact: values are copied, never recomputed. Works for any world size,
    including the one that wrote the checkpoint. Relies on the partition layout of DeepSpeed's
    ZeRO optimizers (the attributes its universal checkpoint uses too), checked against 0.19.8
    by ``tests/dist/test_zero_reshard.py``.

    Every rank must call it. Same trust boundary as :func:`ssl_dist.dist.zero.load`.

    Raises:
        ValueError: fp16 (its loss-scaler state is not carried), a stage-3 checkpoint into a
            stage-1/2 engine or the reverse, or state that does not fit the engine's model.
        RuntimeError: a DeepSpeed release outside the tested series
            (:func:`check_reshard_support`).
    """
    import deepspeed

    check_reshard_support(deepspeed.__version__)
    root, name = checkpoint_dir(directory, tag)
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
                    what = key or "weights"
                    raise ValueError(
                        f"{piece.name}: saved {what} has {src.numel()} elements, the parameter "
                        f"{numel}"
                    )
                dst = piece.flat if not key else base.state[piece.flat][key]
                dst.narrow(0, piece.flat_start, piece.length).copy_(
                    src.narrow(0, piece.full_start, piece.length)
                )
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False  # ZeRO 1-2: re-link fragments to the new state

    states = model_states(ckpt)
    engine.global_steps = int(states["global_steps"])
    engine.global_samples = int(states.get("global_samples", 0))
    engine.skipped_steps = int(states.get("skipped_steps", 0))
    return dict(states.get(CLIENT_STATE_KEY) or {})


# --- DeepSpeed 0.19's ZeRO partition layout -------------------------------------------------
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
                shapes = model_states(ckpt)["param_shapes"]
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
