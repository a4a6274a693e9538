"""ZeRO-3 parameter gathering: under stage 3 every parameter (frozen momentum encoders included)
is partitioned across ranks, and code that reads or changes whole tensors (the EMA, the kNN
monitor, re-sharding) does so inside :func:`gathered`. A no-op under stages 0-2."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn


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
