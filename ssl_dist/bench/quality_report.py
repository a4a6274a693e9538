"""What the quality bench writes besides its table and JSON: the probe / kNN curves against
training time as a PNG, and one MLflow run with the summary metrics, the JSON and the plot."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssl_dist import tracking

EXPERIMENT = "ssl-dist-bench"


def plot(
    out: Path,
    curves: dict[str, list[dict[str, Any]]],
    lines: dict[str, dict[str, float]],
    title: str,
) -> Path:
    """Two panels, linear probe and kNN top-1 against training minutes: one line per method,
    the baselines (`lines`: name -> its ``probe_top1`` / ``knn_top1``) as horizontal rules."""
    import matplotlib  # heavy (a second): only for the plot at the end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    styles = ["k:", "r-.", "g--", "b:", "m-."]
    panels = (("probe_top1", "linear probe"), ("knn_top1", "kNN (k=20)"))
    for ax, (metric, name) in zip(axes, panels, strict=True):
        for method, rows in curves.items():
            t = [r["train_s"] / 60 for r in rows]
            ax.plot(t, [100 * r[metric] for r in rows], "o-", label=method)
        for (base, values), style in zip(lines.items(), styles * 3, strict=False):
            if metric in values:
                ax.axhline(
                    100 * values[metric], linestyle=style[1:], color=style[0], lw=1, label=base
                )
        ax.set_xlabel("pretraining wall-clock (min)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 on the 10k test set (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def log_mlflow(
    uri: str,
    doc: dict[str, Any],
    files: Sequence[Path],
    timeout_s: float = 60.0,
    linked_runs: Sequence[str] = (),
) -> str | None:
    """One run in experiment ``ssl-dist-bench``: summary metrics, the JSON and the plot.
    Bounded; None (and a warning) when the store is slow or down."""

    def log() -> str:
        from mlflow.entities import Metric, Param, RunTag  # heavy (mlflow): only when logging

        c = tracking.client(uri)
        exp = tracking.experiment_id(c, EXPERIMENT, uri)
        run = c.create_run(exp, run_name=f"quality-{doc['dataset']}-{doc['budget_min']:g}min")
        run_id: str = run.info.run_id
        now = int(time.time() * 1000)
        metrics = []
        for r in doc["rows"]:
            key = r["encoder"].replace(" ", "_").replace("@", "at")
            for m in ("probe_top1", "knn_top1"):
                if isinstance(r.get(m), float):
                    metrics.append(Metric(f"{key}/{m}", r[m], now, int(r.get("step") or 0)))
        for method, rows in doc["curves"].items():
            for r in rows:
                for m in ("probe_top1", "knn_top1"):
                    metrics.append(Metric(f"curve/{method}/{m}", r[m], now, int(r["train_s"])))
        params = [
            Param(k, str(doc[k])[:6000])
            for k in ("budget_min", "recipe", "methods", "workers", "dataset")
        ]
        tags = [RunTag("ssl_dist.bench", "quality")]
        tags += [RunTag(f"ssl_dist.pretrain_run.{i}", r) for i, r in enumerate(linked_runs)]
        c.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        for f in files:
            c.log_artifact(run_id, str(f))
        c.set_terminated(run_id)
        return run_id

    return tracking.bounded(log, timeout_s, f"log the quality bench at {uri}")
