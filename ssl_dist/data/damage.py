"""What damaged data cost: per shard (lost and undecodable samples, file problems), per rank
(:class:`StreamStats`, kept by the stream), and across ranks for one epoch (:class:`EpochDamage`,
gathered by the worker loop and logged to MLflow). See :mod:`ssl_dist.data.stream` for when each
count is taken and what ``data.on_damage`` does with it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ShardReport:
    """What one shard cost a rank in one epoch."""

    name: str
    expected: int
    """Samples in the manifest."""
    read: int | None = None
    """Samples found in the shard (decodable or not); None until it was read to its end."""
    skipped: set[str] = field(default_factory=set)
    """Keys of its samples that did not decode."""
    problems: list[str] = field(default_factory=list)
    """What is wrong with the file: missing, size, sha256, where reading it broke off."""

    @property
    def lost(self) -> int:
        """Samples the manifest counts that were not found (0 until read to its end)."""
        return 0 if self.read is None else max(0, self.expected - self.read)

    @property
    def damaged(self) -> bool:
        """A shard problem (as opposed to single undecodable samples)."""
        return bool(self.problems or self.lost)

    def line(self) -> str:
        counts = []
        if self.lost:
            counts.append(f"{self.lost} of {self.expected} samples lost")
        elif self.read is None and self.problems:
            counts.append("not read this epoch")
        if self.skipped:
            counts.append(f"{len(self.skipped)} samples skipped (do not decode)")
        return f"{self.name}: " + "; ".join(p for p in [", ".join(counts), *self.problems] if p)


@dataclass
class StreamStats:
    batches: int = 0
    samples: int = 0
    topups: int = 0
    """Extra passes over this rank's shards needed to fill the batch count."""
    repeats: int = 0
    """Samples in this epoch's batches that came from those extra passes (read twice)."""
    seconds: float = 0.0
    shards: dict[str, ShardReport] = field(default_factory=dict)
    """Reports of the shards that lost or skipped samples or have a problem, by name."""

    @property
    def skipped(self) -> int:
        """Samples that did not decode (each counted once, however often read)."""
        return sum(len(r.skipped) for r in self.shards.values())

    @property
    def lost(self) -> int:
        """Samples of damaged shards that could not be read: manifest count minus found."""
        return sum(r.lost for r in self.shards.values())

    def report(self) -> list[str]:
        """One line per shard that cost samples or has a problem."""
        return [r.line() for _, r in sorted(self.shards.items())]

    def row(self, names: list[str]) -> torch.Tensor:
        """This rank's counts as one float64 vector for a gather across ranks: skipped, lost,
        repeats, then (lost, skipped, damaged) per shard of `names` (the manifest's order)."""
        out = torch.zeros(3 + 3 * len(names), dtype=torch.float64)
        out[:3] = torch.tensor([self.skipped, self.lost, self.repeats], dtype=torch.float64)
        index = {n: i for i, n in enumerate(names)}
        for name, r in self.shards.items():
            i = 3 + 3 * index[name]
            out[i : i + 3] = torch.tensor([r.lost, len(r.skipped), float(r.damaged)])
        return out


@dataclass
class EpochDamage:
    """Every rank's counts for one epoch, from the rows of :meth:`StreamStats.row`."""

    skipped: list[int]
    lost: list[int]
    repeats: list[int]
    """Per rank."""
    shards: dict[str, tuple[int, int, list[int]]]
    """Shards with damage or skipped samples: name -> (lost, skipped, ranks that read it)."""
    damaged: list[str]
    """Names of the shards with a shard problem (missing, size, sha256, cut short)."""

    @classmethod
    def from_rows(cls, rows: torch.Tensor, names: list[str]) -> EpochDamage:
        rows = rows.round().to(torch.int64)
        per = rows[:, 3:].reshape(rows.shape[0], len(names), 3)
        shards, damaged = {}, []
        for i, name in enumerate(names):
            col = per[:, i, :]
            if col.any():
                ranks = [r for r in range(rows.shape[0]) if col[r].any()]
                shards[name] = (int(col[:, 0].sum()), int(col[:, 1].sum()), ranks)
                if col[:, 2].any():
                    damaged.append(name)
        return cls(rows[:, 0].tolist(), rows[:, 1].tolist(), rows[:, 2].tolist(), shards, damaged)

    def metrics(self) -> dict[str, float]:
        """``data/...`` totals over ranks and ``data/rank{r}/...`` per rank."""
        out = {
            "data/samples_lost": float(sum(self.lost)),
            "data/samples_skipped": float(sum(self.skipped)),
            "data/topup_repeats": float(sum(self.repeats)),
            "data/shards_damaged": float(len(self.damaged)),
        }
        for r, (s, lost, rep) in enumerate(zip(self.skipped, self.lost, self.repeats, strict=True)):
            out[f"data/rank{r}/samples_lost"] = float(lost)
            out[f"data/rank{r}/samples_skipped"] = float(s)
            out[f"data/rank{r}/topup_repeats"] = float(rep)
        return out

    def lines(self) -> list[str]:
        """The report, one line per affected shard and one of totals; empty when clean."""
        if not (self.shards or any(self.repeats)):
            return []
        out = [
            f"{name}: {lost} samples lost, {skipped} skipped (rank {', '.join(map(str, ranks))})"
            + (" [damaged]" if name in self.damaged else "")
            for name, (lost, skipped, ranks) in self.shards.items()
        ]
        out.append(
            f"data: {sum(self.lost)} samples lost, {sum(self.skipped)} skipped, "
            f"{sum(self.repeats)} top-up repeats (per rank: lost {self.lost}, skipped "
            f"{self.skipped}, repeats {self.repeats})"
        )
        return out
