"""The GPU check rehearsed on this CPU: ``launch/gpu_check.sh --device cpu --steps 2`` runs its
cases through the per-worker path without Ray and writes its table's JSON. Every case of the
small model (each method, precision and ZeRO stage) and SimCLR's of the large one (its own
encoder, JPEG shards and stem; the methods are the same code at either size): 16 of 24 cases,
two thirds of the time."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_rehearsal_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "gpu_check.sh"),
            "--device",
            "cpu",
            "--steps",
            "2",
            "--work",
            str(tmp_path / "work"),
            "--fmnist",
            str(tmp_path / "no-carried-shards"),
            "--out",
            str(out),
            "--only",
            "resnet18-32px",
            "resnet50-224px,simclr",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    cases = {(r["model"], r["method"], r["precision"], r["zero"]) for r in rows}
    assert len(rows) == len(cases) == (3 + 1) * 2 * 2  # (methods + 1) x precisions x stages
    assert {c[:2] for c in cases if c[0] == "resnet50-224px"} == {("resnet50-224px", "simclr")}
    assert {r["precision"] for r in rows} == {"bf16", "fp32"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["images_s"] > 0 and r["tflop_s"] > 0
        assert all(r[f"{p}_ms"] > 0 for p in ("inputs", "forward", "backward", "optimizer")), r
    assert doc["complete"] is True  # rewritten after every case, marked complete at the end
    assert doc["bf16_peak_tflop_s"] > 0 and doc["machine"]["cpu_capability"]
    assert "cases ok" in proc.stdout and "| model" in proc.stdout


def test_an_unknown_only_name_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "gpu_check.sh"),
            "--device",
            "cpu",
            "--only",
            "resnet18-32px",
            "resnet50-224px,smclr",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "o.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--only names no case: smclr" in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "o.json").exists()
