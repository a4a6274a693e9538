"""Training precision: which one a run uses, and the autocast context that applies it.

bf16 here means mixed precision by autocast: the weights, their gradients, the optimizer state
and every momentum (EMA) encoder stay float32; matrix products and convolutions run in bf16
inside the forward; losses and their logits are computed in float32 (:mod:`ssl_dist.losses`
turns autocast off). This is what MoCo v3's reference code does (``torch.cuda.amp.autocast``
with fp32 weights). The alternative, DeepSpeed's ``bf16`` mode, casts the whole module to bf16,
momentum encoder included, and an EMA step at m = 0.999 is below bf16's resolution for most
weights (``tests/dist/test_zero.py`` shows the difference).

``zero.precision: auto`` resolves to bf16 where the hardware computes it natively: a CUDA GPU
that supports bf16, or a CPU with AVX-512 BF16 or AMX tiles. Elsewhere bf16 is emulated (on a
CPU with AVX2 only, a bf16 matrix product runs tens of times slower than fp32), so auto picks
fp32; an explicit ``bf16`` is still honoured there.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal

import torch

Resolved = Literal["fp32", "bf16"]


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX-512 BF16 or AMX tiles)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def native_bf16(device: torch.device) -> bool:
    """True when `device` computes bf16 natively (see the module docstring)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve(precision: str, device: torch.device | str) -> Resolved:
    """The precision a run on `device` uses for the configured `precision`.

    Args:
        precision: ``zero.precision``: ``auto``, ``fp32`` or ``bf16``.
        device: The worker's training device.

    Raises:
        ValueError: an unknown precision.
    """
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision in ("fp32", "bf16"):
        return precision  # type: ignore[return-value]
    raise ValueError(f"zero.precision must be auto, fp32 or bf16, got {precision!r}")


def describe(precision: str, device: torch.device | str) -> str:
    """One line for the run's start: the configured and the resolved precision, and why."""
    device = torch.device(device)
    used = resolve(precision, device)
    where = f"{device.type}" + (
        f", {torch.backends.cpu.get_cpu_capability()}" if device.type == "cpu" else ""
    )
    how = "autocast, fp32 weights" if used == "bf16" else "fp32 throughout"
    native = "native" if native_bf16(device) else "emulated"
    why = f" (auto: bf16 is {native} on this {where})" if precision == "auto" else ""
    slow = " -- bf16 is emulated here and slow" if used == "bf16" and native == "emulated" else ""
    return f"precision: {used} ({how}){why}{slow}"


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager[None]:
    """The autocast context of a forward pass at resolved `precision` (a no-op for fp32)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def full_precision(device_type: str) -> AbstractContextManager[None]:
    """Autocast off (inside a loss: its logits stay float32 whatever the caller enabled)."""
    return torch.autocast(device_type, enabled=False)
