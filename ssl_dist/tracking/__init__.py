"""MLflow tracking: one MLflow run per logical training run, written by rank 0 only.

Who writes what:

- the driver (`ssl-dist pretrain`) finds or creates the run before any worker starts, logs the
  resolved config as params and the lineage tags; at the end it logs the figures and the encoder
  as an MLflow model, and registers it under `tracking.model_name` with `tracking.alias`;
- rank 0 of the workers logs per-step and per-epoch metrics, system metrics and the checkpoint
  artifacts through `RunLogger`, a background thread with a bounded buffer, so that a slow or
  dead tracking server never blocks a training step.

A run is identified by the tag ``ssl_dist.run_key`` = ``<storage_path>/<run.name>``: a restart
after a failure, or the same run name started again, finds the same MLflow run. Its id is also
kept in every Ray checkpoint (`TrainState.mlflow_run_id`).

Tracking targets: a sqlite database in the run storage folder by default (nothing to start), or
any `http(s)://` tracking server; credentials come from MLflow's own environment variables
(`MLFLOW_TRACKING_TOKEN`, `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, ...).
"""

from __future__ import annotations

from ssl_dist.tracking.client import (
    DEFAULT_ARTIFACTS,
    DEFAULT_DB,
    HTTP_TIMEOUT_S,
    RUN_KEY_TAG,
    artifact_root,
    bound_http_client,
    bounded,
    client,
    experiment_id,
    mlflow_uris,
    resolve_uri,
)
from ssl_dist.tracking.logger import (
    NodeMetrics,
    RunLogger,
)
from ssl_dist.tracking.registry import (
    FINISH_TIMEOUT_S,
    MODEL_NAME_IN_RUN,
    MODEL_REQUIREMENTS,
    EncoderSample,
    curves_figure,
    embedding_figure,
    finish_run,
    log_encoder_model,
    model_requirements,
    ui_command,
)
from ssl_dist.tracking.run import (
    START_TIMEOUT_S,
    find_or_create_run,
    find_run,
    git_tags,
    lineage_tags,
    manifest_tag,
    run_key,
    start_run,
)

__all__ = [
    "DEFAULT_ARTIFACTS",
    "DEFAULT_DB",
    "EncoderSample",
    "FINISH_TIMEOUT_S",
    "HTTP_TIMEOUT_S",
    "MODEL_NAME_IN_RUN",
    "MODEL_REQUIREMENTS",
    "NodeMetrics",
    "RUN_KEY_TAG",
    "RunLogger",
    "START_TIMEOUT_S",
    "artifact_root",
    "bound_http_client",
    "bounded",
    "client",
    "curves_figure",
    "embedding_figure",
    "experiment_id",
    "find_or_create_run",
    "find_run",
    "finish_run",
    "git_tags",
    "lineage_tags",
    "log_encoder_model",
    "manifest_tag",
    "mlflow_uris",
    "model_requirements",
    "resolve_uri",
    "run_key",
    "start_run",
    "ui_command",
]
