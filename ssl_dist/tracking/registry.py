"""Driver side at the end of a run: figures (loss / lr curves, an embedding PCA), the encoder as
an MLflow pyfunc model that loads without ssl-dist, the registered version, its tags and alias."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ssl_dist.artifact import CONFIG, ENCODER
from ssl_dist.models import encoders
from ssl_dist.tracking.client import bounded, client, mlflow_uris, resolve_uri
from ssl_dist.tracking.run import find_or_create_run, manifest_tag, run_key
from ssl_dist.train.checkpoint import TrainState

FINISH_TIMEOUT_S = 300.0
MODEL_NAME_IN_RUN = "encoder"


def curves_figure(mlflow_client, run_id: str):
    """Loss and learning-rate curves from the run's metric history (every restart included)."""
    import matplotlib  # heavy (a second), and only the driver draws, once per run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("loss", "lr"), strict=True):
        hist = sorted(mlflow_client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], lw=1)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def embedding_figure(features: Tensor, labels: Tensor, classes: list[str]):
    """2-D PCA of the val split's features, coloured by class."""
    import matplotlib  # heavy (a second), and only the driver draws, once per run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = features - features.mean(0)
    _, _, v = torch.pca_lowrank(x, q=2, center=False)
    xy = (x @ v[:, :2]).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        sel = (labels == c).numpy()
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(c % cmap.N), label=name)
    ax.set_title("val split, encoder features (PCA)")
    ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


@dataclass
class EncoderSample:
    """What the driver hands to :func:`finish_run` about the trained encoder, so that tracking
    never builds a data pipeline or an encoder itself
    (:func:`ssl_dist.evaluate.embedding.encoder_sample` makes one)."""

    features: Tensor
    """Encoder features ``[N, F]`` of (up to a few thousand) val samples, for the PCA figure."""
    labels: Tensor
    """Their classes ``[N]``."""
    classes: list[str]
    """Class names (the manifest's)."""
    example: np.ndarray
    """A model input ``[2, C, H, W]`` float32 (the plain view): the model's input example."""
    example_features: np.ndarray
    """The encoder's output for `example`: with it, the model's signature."""


def finish_run(
    cfg, checkpoint_dir: Path, final_metrics: dict[str, float], sample: EncoderSample | None = None
) -> dict | None:
    """Driver side, after training: figures, the MLflow model, the registered version + alias.

    `sample` gives the embedding figure and the model's input example and signature (without
    it the model is logged without them).

    Bounded and never raising: returns ``{"run_id", "model_uri", "version"}`` or None.
    """
    if not cfg.tracking.enabled:
        return None
    uri = resolve_uri(cfg.tracking.uri, cfg.run.storage_path)
    return bounded(
        lambda: _finish(cfg, uri, Path(checkpoint_dir), final_metrics, sample),
        FINISH_TIMEOUT_S,
        f"register the encoder at {uri}",
    )


def _finish(
    cfg, uri: str, ckpt: Path, final_metrics: dict[str, float], sample: EncoderSample | None
) -> dict:
    import mlflow  # heavy (mlflow)

    c = client(uri)
    state = TrainState.read(ckpt)
    run_id = state.mlflow_run_id or find_or_create_run(cfg, uri)
    step = state.step
    numeric = {k: float(v) for k, v in final_metrics.items() if isinstance(v, int | float)}
    for k, v in numeric.items():
        c.log_metric(run_id, f"final/{k}", v, step=step)
    c.set_tag(run_id, "ssl_dist.resumed_at", ",".join(map(str, state.resumed_at)) or "none")
    if step < int(final_metrics.get("total_steps", step)):
        # A time-boxed segment (run.stop_at_step): the run goes on later under the same name.
        c.set_tag(run_id, "ssl_dist.paused_at_step", str(step))
        return {"run_id": run_id, "paused_at_step": step}
    name = cfg.tracking.model_name
    done = [
        v
        for v in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if v.tags.get("ssl_dist.step") == str(step)
    ]
    if done:
        # Finished before (a job that crashed after registering and is run again): the same
        # version, not a duplicate.
        version = max(done, key=lambda v: int(v.version))
        if cfg.tracking.alias.lower() != "latest":
            c.set_registered_model_alias(name, cfg.tracking.alias, version.version)
        c.set_terminated(run_id, "FINISHED")
        return {
            "run_id": run_id,
            "model_uri": version.source,
            "version": version.version,
            "registered": f"models:/{name}@{cfg.tracking.alias}",
        }
    c.log_figure(run_id, curves_figure(c, run_id), "figures/loss_lr.png")
    if sample is not None:
        figure = embedding_figure(sample.features, sample.labels, sample.classes)
        c.log_figure(run_id, figure, "figures/embedding_pca.png")

    with mlflow_uris(uri):  # log_model and register_model read the process-wide URIs
        with mlflow.start_run(run_id=run_id):
            info = log_encoder_model(ckpt, sample)
        version = mlflow.register_model(info.model_uri, cfg.tracking.model_name)
    tags = {
        "ssl_dist.run_key": run_key(cfg.run.storage_path, cfg.run.name),
        "ssl_dist.step": str(step),
        "ssl_dist.method": cfg.method.name,
        "ssl_dist.data_manifest": cfg.data.manifest,
    }
    tags.update(manifest_tag(cfg.data.manifest))
    for k, v in tags.items():
        c.set_model_version_tag(cfg.tracking.model_name, version.version, k, v)
    if cfg.tracking.alias.lower() != "latest":
        # MLflow reserves `latest`: `models:/name@latest` always resolves to the newest version.
        c.set_registered_model_alias(cfg.tracking.model_name, cfg.tracking.alias, version.version)
    c.set_terminated(run_id, "FINISHED")
    return {
        "run_id": run_id,
        "model_uri": info.model_uri,
        "version": version.version,
        "registered": f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}",
    }


MODEL_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pyyaml")
"""What the registered model imports (besides mlflow, which MLflow adds itself)."""


def model_requirements() -> list[str]:
    """Pins for the registered model's environment: each of `MODEL_REQUIREMENTS` at the version
    installed here, without a local build label (``2.14.1+cu130`` -> ``2.14.1``, which package
    indexes serve). ssl-dist itself is not among them: the model ships the code it needs."""
    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in MODEL_REQUIREMENTS]


def log_encoder_model(checkpoint_dir: Path, sample: EncoderSample | None = None):
    """Log the encoder artifact in `checkpoint_dir` as a pyfunc model of the active MLflow run:
    the code file `ssl_dist/mlflow_model.py`, the architecture as ``code/ssl_dist_encoders.py``,
    the weights (safetensors) and config as artifacts, pinned requirements, and (with `sample`)
    an input example and the signature example -> features. Returns MLflow's ``ModelInfo``."""
    # heavy (mlflow); mlflow_model imports mlflow at its top
    import mlflow
    from mlflow.models import infer_signature

    from ssl_dist import mlflow_model  # imports mlflow and registers the model on import

    ckpt = Path(checkpoint_dir)
    example, signature = None, None
    if sample is not None:
        example = sample.example
        signature = infer_signature(sample.example, sample.example_features)
    with tempfile.TemporaryDirectory(prefix="ssl-dist-model-code-") as tmp:
        arch = Path(tmp) / f"{mlflow_model.ARCH_MODULE}.py"
        shutil.copyfile(encoders.__file__, arch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(Path(mlflow_model.__file__)),
                code_paths=[str(arch)],
                artifacts={"encoder": str(ckpt / ENCODER), "config": str(ckpt / CONFIG)},
                pip_requirements=model_requirements(),
                signature=signature,
                input_example=example,
            )


def ui_command(uri: str, run_id: str | None = None) -> str:
    """The command that opens the MLflow UI on this store (on the run's page when given)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = base
    if run_id:
        try:
            experiment = client(uri).get_run(run_id).info.experiment_id
            page = f"{base}/#/experiments/{experiment}/runs/{run_id}"
        except Exception:  # noqa: BLE001 - the plain address still helps
            pass
    if uri.startswith(("http://", "https://")):
        return f"open {page}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000  # then open {page}"
