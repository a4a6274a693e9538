"""Process-group helpers: rank queries and gradient-correct gathers."""

from ssl_dist.dist.collectives import (
    all_gather_no_grad,
    all_gather_with_grad,
    is_rank_zero,
    rank,
    world_size,
)

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "is_rank_zero", "rank", "world_size"]
