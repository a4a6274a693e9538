"""Run a function on every rank of a spawned gloo group on this machine and collect the results.

The one place that starts local process groups: the distributed tests and the gloo benchmarks
(``bench loss``, the phase timing of ``bench scaling``) use it, and :func:`single_rank_group`
gives the GPU check its one-rank group in this process. Ray Train starts the training workers'
groups itself.

Usage::

    from ssl_dist.dist.spawn import run_world

    def _worker(rank, world_size, n):  # module level, so that spawn can pickle it
        ...
        return {"loss": loss.detach()}

    results = run_world(_worker, 2, 4)  # [rank 0's dict, rank 1's dict]

Results travel as ``torch.save`` bytes and are read back with ``weights_only=True``: tensors,
numbers, strings, lists, tuples and dicts are fine. Tensors sent through the queue directly
would use shared memory that dies with the child.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FAILURE_GRACE_S = 5.0
"""After one rank fails, how long its peers get to report their own errors: they may be stuck
in a collective with the failed rank, so the world is stopped then."""


class WorldError(RuntimeError):
    """One or more ranks raised or did not finish; ``failures`` maps rank -> traceback text."""

    def __init__(self, message: str, failures: dict[int, str]):
        super().__init__(message)
        self.failures = failures


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def single_rank_group(device: torch.device) -> Iterator[None]:
    """A one-rank process group in this process (NCCL for a GPU, gloo for a CPU), with the
    environment a launcher would set (``RANK``, ``LOCAL_RANK``...), destroyed on exit."""
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _child(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    threads: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    # Ranks share the machine's cores: more intra-op threads would only oversubscribe them.
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        # Keep gloo on loopback even if the host name resolves to an unreachable interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _read(rank: int, payload: bytes) -> tuple[bool, Any]:
    """``(True, value)``, or ``(False, why)`` for a value ``weights_only`` loading refuses."""
    try:
        return True, torch.load(io.BytesIO(payload), weights_only=True)
    except Exception:
        why = f"rank {rank} returned a value that torch.load(weights_only=True) refuses:\n"
        return False, why + traceback.format_exc()


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    Every rank joins a gloo group on 127.0.0.1 at a free port (``GLOO_SOCKET_IFNAME=lo`` on
    Linux) before ``fn`` runs and leaves it after.

    Args:
        fn: Module-level (picklable) function; its return value must be ``torch.save``-able and
            loadable with ``weights_only=True``.
        world_size: Number of processes.
        *args: Picklable extra arguments, the same for every rank.
        timeout: Seconds for the whole world, also the process-group timeout.
        threads: Torch intra-op threads per rank.

    Returns:
        The per-rank return values, index = rank.

    Raises:
        WorldError: if any rank raised (with every reported traceback), was killed, or the
            world timed out.
    """
    if world_size < 1 or threads < 1:
        raise ValueError(f"world_size and threads must be at least 1, got {world_size}, {threads}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, timeout, threads, fn, args, results),
            # Not daemonic, so a rank may start DataLoader workers; stragglers are killed below.
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                # A rank killed by a signal reports nothing: stop waiting for it.
                for r, proc in enumerate(procs):
                    if proc.exitcode not in (None, 0) and r not in outputs and r not in failures:
                        failures[r] = f"rank {r} exited with code {proc.exitcode}"
                        deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
                continue
            if ok:
                ok, payload = _read(rank, payload)
            if ok:
                outputs[rank] = payload
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
    finally:
        for proc in procs:
            proc.join(timeout=5.0 if not failures else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()

    failed = sorted(failures)
    for r in range(world_size):
        if r not in outputs and r not in failures:
            failures[r] = (
                f"rank {r} was stopped {FAILURE_GRACE_S} s after rank(s) {failed} failed"
                if failed
                else f"rank {r} did not finish within {timeout} s"
            )
    if failures:
        text = "\n".join(f"--- rank {r} ---\n{failures[r]}" for r in sorted(failures))
        raise WorldError(f"{len(failures)} of {world_size} ranks failed:\n{text}", failures)
    return [outputs[r] for r in range(world_size)]
