"""Tables and JSON for benchmarks, with the machine they ran on."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ssl_dist.atomic import write_atomic


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        # AVX2 / AVX512 / AMX...: what the CPU's matrix kernels can use (bf16 is native only
        # with AVX-512 BF16 or AMX); speeds differ 2-3x between machines of one kind.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def timed(fn: Callable[[], int], min_seconds: float) -> tuple[float, int]:
    """Run `fn` (returning the items it processed) until `min_seconds` pass; (seconds, items)."""
    start = time.perf_counter()
    items = 0
    while True:
        items += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed, items


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[c for c in columns]] + [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine_line(info: dict[str, Any] | None = None) -> str:
    """The machine in one line, printed beside every benchmark's tables."""
    m = info or machine()
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ", no GPU"
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, CPU capability {m['cpu_capability']}, "
        f"{m['memory_gib']} GiB{gpu}, torch {m['torch']}, {m['date']}"
    )


def write(out: Path, name: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """Write the bench's JSON (with the machine) and print the machine line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": name, "machine": machine(), "rows": rows, **extra}
    write_atomic(out, json.dumps(doc, indent=2))
    print(machine_line(doc["machine"]))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def matmul_gflops(
    threads: int, seconds: float = 2.0, n: int = 1024, dtype: torch.dtype = torch.float32
) -> float:
    """Sustained ``n x n`` matmul GFLOP/s with `threads` intra-op threads (best of 3 rounds)."""
    with torch_threads(threads):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up (and oneDNN / AMX kernel selection)
        best = 0.0
        for _ in range(3):
            k, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 3:
                a @ b
                k += 1
            best = max(best, 2 * n**3 * k / (time.perf_counter() - start) / 1e9)
        return best


def matmul_peaks() -> dict[str, float]:
    """This machine's matmul GFLOP/s (fp32 on 1 thread and on every core, bf16 on every core),
    so that results from a slower or faster machine can be read against ours."""
    cores = os.cpu_count() or 1
    return {
        "fp32_1_thread": matmul_gflops(1),
        f"fp32_{cores}_threads": matmul_gflops(cores),
        f"bf16_{cores}_threads": matmul_gflops(cores, dtype=torch.bfloat16),
    }
