"""`bench loss`'s gloo measurement through the spawner: one row per global batch, the same on
every rank, with the negatives each variant sees."""

from __future__ import annotations

import pytest

from ssl_dist.bench.loss import LOSS_COLUMNS, loss_rows

pytestmark = pytest.mark.dist


def test_loss_rows_from_a_gloo_world() -> None:
    rows = loss_rows([4, 8], dim=8, world_size=2, temperature=0.2, seconds=0.01)
    assert [r["global_batch"] for r in rows] == [4, 8]
    assert [r["per_rank"] for r in rows] == [2, 4]
    assert [r["negatives_gathered"] for r in rows] == [6, 14]
    assert [r["negatives_local"] for r in rows] == [2, 6]
    for r in rows:
        assert set(r) == set(LOSS_COLUMNS)
        assert r["gathered_ms"] > 0 and r["local_ms"] > 0 and r["gather_only_ms"] > 0


def test_loss_rows_refuse_batches_that_do_not_split() -> None:
    with pytest.raises(ValueError, match="not multiples of world_size=2"):
        loss_rows([5], dim=8, world_size=2, temperature=0.2, seconds=0.01)
