"""Everything that touches process groups or DeepSpeed (no other package imports
``torch.distributed`` or ``deepspeed``).

Re-exported here: rank queries and gradient-correct gathers (:mod:`.collectives`). The other
modules are imported by name: :mod:`.zero` (engines, ZeRO-3 gathering, save / load),
:mod:`.checkpoint_files`, :mod:`.reshard`, :mod:`.memory` and :mod:`.spawn` (local gloo worlds).
"""

from ssl_dist.dist.collectives import (
    all_gather_no_grad,
    all_gather_with_grad,
    is_rank_zero,
    rank,
    world_size,
)

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "is_rank_zero", "rank", "world_size"]
