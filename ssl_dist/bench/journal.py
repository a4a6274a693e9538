"""`bench quality`'s journal: what a bench has finished, kept in its work directory after each
piece (a pretraining run, then at once its probe curve; the supervised reference), so that
``--resume`` continues a bench that was cut short (a lost machine, a time limit on the session)
instead of starting over. ``--method all`` at the default budget takes about three and a half
hours on a 2-core CPU (three with ``--checkpoints 2``).

A run is probed as soon as it ends, so a finished run needs its checkpoints no more: the journal
file alone carries a bench to another machine (copy it into the new work dir, then
``--resume``). A run journaled without its curve (cut short while probed) is probed on resume
when its checkpoints are still there, and run again when they are gone.

The journal is keyed by everything that decides the results (methods, budget, recipe file
bytes, overrides, checkpoints, seeds, the scored split, the shards' manifest): a resume with
other settings is refused (exit 2), and a bench without ``--resume`` starts a new journal. A
run cut short is not continued from its last checkpoint (its schedule and clock would not be
the budget's): it is run again, under a new name. Calibrations are not carried over either: a
machine's speed differs from one day to the next, so each part calibrates what it runs; each
part's date, matmul peaks and load average are kept (``parts`` in the JSON), since the table
then mixes runs measured on more than one occasion.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ssl_dist.atomic import write_atomic
from ssl_dist.bench.budget import Calibration, Pretrained
from ssl_dist.config import ConfigError

JOURNAL = "quality-journal.json"


class Journal:
    """The finished pieces of one bench: pretraining runs, their calibrations and probe curves
    by run key (a method, or ``<method>_seed<N>``), the supervised reference, the parts."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.dropped: list[str] = []
        """Runs a resume found unprobed with their checkpoints gone: they run again."""

    @staticmethod
    def require(work: Path) -> None:
        """ConfigError unless `work` holds a journal (checked before any work when resuming)."""
        if not (work / JOURNAL).is_file():
            raise ConfigError(f"--resume: no bench to resume in {work} (no {JOURNAL})")

    @classmethod
    def open(cls, work: Path, settings: dict[str, Any], resume: bool) -> Journal:
        """This bench's journal in `work`: the one there when resuming (same settings: else
        ConfigError), else a new one (written at the first finished piece)."""
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        path = work / JOURNAL
        if not resume:
            empty: dict[str, Any] = {
                "runs": {},
                "curves": {},
                "calibrations": {},
                "supervised": None,
            }
            return cls(path, {"key": key, "settings": settings, "parts": [], **empty})
        cls.require(work)
        data = json.loads(path.read_text())
        if data.get("key") != key:
            old = data.get("settings", {})
            differ = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
            raise ConfigError(
                f"--resume: the bench in {work} ran with other settings ({', '.join(differ)}); "
                "run without --resume to start a new one"
            )
        journal = cls(path, data)
        for k in [k for k in data["runs"] if k not in data["curves"]]:
            points = data["runs"][k]["points"]
            if not all(Path(p["path"]).is_dir() for p in points if p["path"]):
                del data["runs"][k]  # never probed and its checkpoints are gone: run again
                data["calibrations"].pop(k, None)
                journal.dropped.append(k)
        return journal

    def begin_part(self, peaks: dict[str, float], load: tuple[float, ...]) -> None:
        """A new part of the bench starts here (this process)."""
        self.data["parts"].append(
            {
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "matmul_peak_gflop_s": peaks,
                "load_avg_1_5_15_min": list(load),
                "cpu_count": os.cpu_count(),
                "runs": [],
            }
        )

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.data, indent=1))

    @property
    def resumed(self) -> bool:
        return len(self.data["parts"]) > 1

    def runs(self) -> dict[str, Pretrained]:
        return {k: Pretrained.from_json(d) for k, d in self.data["runs"].items()}

    def add_run(self, key: str, p: Pretrained, cal: Calibration) -> None:
        self.data["runs"][key] = p.to_json()
        self.data["calibrations"][key] = asdict(cal)
        self.data["parts"][-1]["runs"].append(key)
        self.save()

    def resumer(
        self, probe: Callable[[str, Pretrained], list[dict[str, Any]]], phases: dict[str, float]
    ) -> dict[str, Any]:
        """`budget.pretrain_all`'s ``done`` (the finished runs) and ``on_done``: journals a run,
        then at once its probe curve ``probe(key, run)`` (timed into `phases`)."""

        def on_done(key: str, p: Pretrained, cal: Calibration) -> None:
            self.add_run(key, p, cal)
            self.curve(key, phases, lambda: probe(key, p))

        return {"done": self.runs(), "on_done": on_done}

    def curve(
        self, key: str, phases: dict[str, float], probe: Callable[[], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Run `key`'s probe curve: the journal's, else `probe()` (timed into `phases` as
        ``<key>_probes_s``, then journaled)."""
        if key not in self.data["curves"]:
            start = time.perf_counter()
            self.data["curves"][key] = probe()
            phases[f"{key}_probes_s"] = time.perf_counter() - start
            self.save()
        return self.data["curves"][key]

    @property
    def supervised(self) -> dict[str, Any] | None:
        return self.data["supervised"]

    def add_supervised(self, row: dict[str, Any], info: dict[str, Any]) -> None:
        self.data["supervised"] = {"row": row, "info": info}
        self.data["parts"][-1]["runs"].append("supervised")
        self.save()
