"""The files of a checkpoint written by :func:`ssl_dist.dist.zero.save`, read without an engine.

What DeepSpeed 0.19 writes under ``directory``: ``latest`` (the newest tag) and, per tag, a
directory with the model-states file (``mp_rank_00_model_states.pt`` under stages 0-2, one
``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` per rank under stage 3) that holds the module,
DeepSpeed's step counters and the caller's ``client_state`` under :data:`CLIENT_STATE_KEY`, and
under ZeRO 1-3 one optimizer-states file per rank (``zero_pp_rank_{r}_mp_rank_00_optim_states.pt``,
``bf16_`` prefixed under bf16).

Trust boundary: these files are read with ``torch.load(weights_only=False)``, as DeepSpeed reads
them itself (it pickles its own objects into them), i.e. they are unpickled. Only read checkpoint
directories this project wrote itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CLIENT_STATE_KEY = "ssl_dist"
"""Key under which :func:`ssl_dist.dist.zero.save` nests the caller's ``client_state`` in the
model-states file (DeepSpeed returns its own bookkeeping keys alongside the caller's on load)."""


def checkpoint_dir(directory: str | Path, tag: str | None) -> tuple[Path, str]:
    """``(root, tag)`` of a checkpoint; ``tag=None`` reads the one ``root/latest`` names.

    Raises:
        FileNotFoundError: no ``latest`` file, or no such tag directory.
    """
    root = Path(directory)
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {root} (no 'latest' file)")
        tag = latest.read_text().strip()
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {root}")
    return root, tag


def model_states(ckpt: Path) -> dict[str, Any]:
    """The model-states file of checkpoint directory `ckpt` (rank 0's under ZeRO-3), loaded."""
    # Stages 0-2: one mp_rank_00_model_states.pt; stage 3: one per rank, zero_pp_rank_0_... first.
    files = sorted(ckpt.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model-states file")
    # weights_only=False: DeepSpeed pickles its own objects in here (see the module docstring).
    states: dict[str, Any] = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    return states


def state_dict_from_checkpoint(directory: str | Path, tag: str | None = None) -> dict[str, Tensor]:
    """The fp32 state dict of a checkpoint, without an engine or a process group.

    ZeRO 1-3: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (merges the per-rank
    fp32 optimizer shards, buffers and, under stage 3, frozen parameters); frozen parameters
    under stages 1-2 and everything under stage 0 come from the ``module`` entry of the
    model-states file.
    """
    root, tag = checkpoint_dir(directory, tag)
    ckpt = root / tag
    states = model_states(ckpt)
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
