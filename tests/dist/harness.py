"""Spawn a real gloo process group on localhost and collect what each rank returns.

Usage from a test in this folder::

    from harness import run_world

    def _worker(rank, world_size, n):  # module level, so spawn can pickle it
        ...
        return {"loss": loss.detach()}

    results = run_world(_worker, 2, 4)  # [rank 0's dict, rank 1's dict]

Results travel as ``torch.save`` bytes and are read back with ``weights_only=True``: tensors,
numbers, strings, lists, tuples and dicts are fine. Sending tensors through the queue directly
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
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def _child(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    # Two cores shared by several ranks: intra-op threads would only oversubscribe them.
    torch.set_num_threads(1)
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


def run_world(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    Args:
        fn: Module-level (picklable) function; its return value must be ``torch.save``-able and
            loadable with ``weights_only=True``.
        world_size: Number of processes.
        *args: Picklable extra arguments, the same for every rank.
        timeout: Seconds for the whole world, also the process-group timeout.

    Returns:
        The per-rank return values, index = rank.

    Raises:
        WorldError: if any rank raised (with every reported traceback) or the world timed out.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, timeout, fn, args, results),
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
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                for r in dead:
                    if r not in outputs and r not in failures:
                        failures[r] = f"rank {r} exited with code {procs[r].exitcode}"
                continue
            if ok:
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=True)
            else:
                failures[rank] = payload
                # Peers may be stuck in a collective with the failed rank: give them a few
                # seconds to report their own error, then stop.
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        for proc in procs:
            proc.join(timeout=5.0 if not failures else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()

    missing = [r for r in range(world_size) if r not in outputs and r not in failures]
    for r in missing:
        failures[r] = f"rank {r} did not finish within {timeout} s"
    if failures:
        text = "\n".join(f"--- rank {r} ---\n{failures[r]}" for r in sorted(failures))
        raise WorldError(f"{len(failures)} of {world_size} ranks failed:\n{text}", failures)
    return [outputs[r] for r in range(world_size)]
