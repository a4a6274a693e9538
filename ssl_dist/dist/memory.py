"""Memory accounting: what one rank holds in parameters and optimizer state, measured and as
the ZeRO paper predicts it.

Reported at the end of a run (``state_mb`` and ``zero_formula_mb`` in the final metrics) and
compared by ``bench train`` across ZeRO stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def state_bytes(engine: DeepSpeedEngine) -> int:
    """Bytes of parameters and optimizer state this rank holds (each storage counted once).

    Counts the module's parameters (under ZeRO-3 this rank's partition, plus the full copy of a
    "persistent" parameter), the tensors the base optimizer updates (fp32 master partitions
    under ZeRO 1-3, the parameters under stage 0) and its state (e.g. momentum buffers).
    Gradients are transient and left out.
    """
    seen: dict[int, int] = {}

    def add(t: Tensor | None) -> None:
        if isinstance(t, Tensor) and t.numel() > 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in engine.module.parameters():
        add(p.data)  # empty under ZeRO-3 outside forward, unless the parameter is persistent
        add(getattr(p, "ds_tensor", None))  # this rank's ZeRO-3 partition
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in base.param_groups:
        for p in group["params"]:
            add(p.data)
    # ZeRO-3 puts its fp32 partitions in param_groups only during the step; the state is keyed
    # by them all the same.
    for param, state in base.state.items():
        add(param)
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
