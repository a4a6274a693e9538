"""The spawner every gloo test and benchmark runs on: results in rank order, failures reported
with the failing rank's traceback, and no hang when a peer waits in a collective."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

from ssl_dist.dist import collectives
from ssl_dist.dist.spawn import WorldError, run_world

pytestmark = pytest.mark.dist


def _identify(rank: int, world_size: int, tag: str) -> dict:
    # A real collective: every rank sees every rank's id, so the group is the one spawned.
    ranks = collectives.all_gather_no_grad(torch.tensor([rank]))
    return {
        "rank": rank,
        "world_size": world_size,
        "tag": tag,
        "gathered": ranks.tolist(),
        "threads": torch.get_num_threads(),
        "ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
    }


def test_results_come_back_in_rank_order() -> None:
    results = run_world(_identify, 3, "x", timeout=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    for r in results:
        assert r["world_size"] == 3 and r["tag"] == "x"
        assert r["gathered"] == [0, 1, 2]
        assert r["threads"] == 1  # one thread per rank unless asked
        if sys.platform.startswith("linux"):
            assert r["ifname"] == "lo"


def test_threads_per_rank() -> None:
    assert run_world(_identify, 1, "t", timeout=60, threads=2)[0]["threads"] == 2


def _failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    # Rank 0 blocks in a collective its peer never joins; the spawner must not wait for it.
    collectives.all_reduce_mean(torch.ones(1))


def test_failing_rank_raises_with_its_traceback_without_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(WorldError, match="deliberate failure on rank 1") as info:
        run_world(_failing_worker, 2, timeout=120)
    assert time.monotonic() - start < 60  # stopped after the grace period, not at the timeout
    assert "RuntimeError: deliberate failure on rank 1" in info.value.failures[1]
    assert "_failing_worker" in info.value.failures[1]  # the traceback, not just the message
    assert 0 in info.value.failures  # the peer left waiting is reported too


def _returns_a_module(rank: int, world_size: int) -> object:
    return torch.nn.Linear(1, 1)  # pickles, but weights_only loading refuses it


def test_result_that_weights_only_refuses_is_a_failure() -> None:
    with pytest.raises(WorldError, match="weights_only") as info:
        run_world(_returns_a_module, 1, timeout=60)
    assert list(info.value.failures) == [0]


def test_rejects_an_empty_world() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        run_world(_identify, 0, "x")
