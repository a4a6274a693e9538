"""Where a pretrained encoder comes from: a registered model, a run's artifact or a checkpoint.

`load_source` accepts

* ``models:/<name>@<alias>`` and ``models:/<name>/<version>``: a registered model version (its
  pyfunc model folder holds ``encoder.safetensors`` and ``config.yaml``); the lineage names the
  model, the version and the run that produced it;
* ``models:/<model id>``: an MLflow 3 logged model;
* ``runs:/<run id>/<path>``: an artifact (folder) of an MLflow run;
* a local directory: an ssl-dist checkpoint (``encoder.safetensors`` + ``config.yaml``).

Whatever the address, the files are read by :func:`ssl_dist.artifact.read_artifact`: safetensors
only, pickled weights refused, nothing ever unpickled.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_dist import tracking
from ssl_dist.artifact import Artifact, read_artifact
from ssl_dist.config import ConfigError

DEFAULT_STORAGE = "work/runs"
"""Where the default sqlite tracking store lives (``<storage>/mlflow.db``), as for pretraining."""


@dataclass
class EncoderSource(Artifact):
    """A pretrained encoder (weights and the config it was trained with) and where it is from."""

    lineage: dict[str, str] = field(default_factory=dict)
    """``uri`` always; ``model_name``, ``model_version``, ``run_id`` when known."""


_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[^/@]+)/?$")
_MODEL_ID = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)/?$")
_RUN = re.compile(r"^runs:/(?P<run_id>[^/]+)(?:/(?P<path>.*))?$")


def _not_found(e: Exception) -> bool:
    code = getattr(e, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def _resolve_model(client: Any, uri: str) -> tuple[str, dict[str, str]]:
    """The exact ``models:/name/version`` to download and the lineage of a models:/ URI."""
    from mlflow.exceptions import MlflowException  # heavy (mlflow): only for MLflow sources

    lineage = {"uri": uri}
    m_id = _MODEL_ID.match(uri)
    if m_id:
        try:
            logged = client.get_logged_model(m_id["id"])
        except MlflowException as e:
            if _not_found(e):
                raise ConfigError(f"no logged model {m_id['id']!r}: {e.message}") from None
            raise
        if getattr(logged, "source_run_id", None):
            lineage["run_id"] = logged.source_run_id
        return uri, lineage
    m_alias, m_version = _ALIAS.match(uri), _VERSION.match(uri)
    try:
        if m_alias:
            name = m_alias["name"]
            version = client.get_model_version_by_alias(name, m_alias["alias"])
        elif m_version and m_version["version"].isdigit():
            name = m_version["name"]
            version = client.get_model_version(name, m_version["version"])
        else:
            raise ConfigError(
                f"model URI {uri!r}: use models:/<name>@<alias> or models:/<name>/<version number>"
            )
    except MlflowException as e:
        if _not_found(e):
            raise ConfigError(f"no registered model version for {uri!r}: {e.message}") from None
        raise
    lineage.update(model_name=name, model_version=str(version.version))
    if version.run_id:
        lineage["run_id"] = version.run_id
    # Download the version just resolved, even if the alias moves meanwhile.
    return f"models:/{name}/{version.version}", lineage


def _check_sqlite(uri: str) -> None:
    # A missing sqlite file would be created empty by MLflow: say what is wrong instead.
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise ConfigError(
                f"no MLflow database at {db}: pass --tracking-uri (or MLFLOW_TRACKING_URI)"
            )


def _load_mlflow(uri: str, tracking_uri: str) -> EncoderSource:
    # heavy (mlflow, seconds to import): only for models:/ and runs:/ sources
    import mlflow
    from mlflow.exceptions import MlflowException

    _check_sqlite(tracking_uri)
    tracking.bound_http_client()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line of output
    client = tracking.client(tracking_uri)
    if uri.startswith("models:/"):
        download_uri, lineage = _resolve_model(client, uri)
    else:
        m = _RUN.match(uri)
        if m is None or not m["run_id"]:
            raise ConfigError(f"run URI {uri!r}: use runs:/<run id>/<artifact path>")
        download_uri, lineage = uri, {"uri": uri, "run_id": m["run_id"]}
    with (
        tempfile.TemporaryDirectory(prefix="ssl-dist-source-") as tmp,
        tracking.mlflow_uris(tracking_uri),
    ):
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri, dst_path=tmp, tracking_uri=tracking_uri
            )
        except MlflowException as e:
            if _not_found(e):
                raise ConfigError(f"cannot download {uri!r}: {e.message}") from None
            raise
        except FileNotFoundError as e:
            raise ConfigError(f"cannot download {uri!r}: {e}") from None
        found = read_artifact(local)  # read into memory before tmp goes
    return EncoderSource(found.tensors, found.cfg, lineage)


def load_source(uri: str, tracking_uri: str | None = None) -> EncoderSource:
    """Read a pretrained encoder from a models:/ or runs:/ URI or a local checkpoint directory.

    Args:
        uri: ``models:/name@alias``, ``models:/name/version``, ``models:/<model id>``,
            ``runs:/<run id>/<path>`` or a local directory.
        tracking_uri: MLflow tracking (and registry) URI for models:/ and runs:/; default
            ``$MLFLOW_TRACKING_URI``, else the sqlite store ``work/runs/mlflow.db``.

    Raises:
        ConfigError: unknown URI form, nothing found there, no safetensors weights (pickled
            weights are refused, never read), or an invalid ``config.yaml``.
    """
    if uri.startswith(("models:/", "runs:/")):
        try:
            resolved = tracking.resolve_uri(tracking_uri, DEFAULT_STORAGE)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return _load_mlflow(uri, resolved)
    if "://" in uri:
        raise ConfigError(
            f"model {uri!r}: use models:/name@alias, models:/name/version, runs:/<id>/<path> "
            "or a local checkpoint directory"
        )
    path = Path(uri).expanduser()
    if not path.exists():
        raise ConfigError(f"model {uri!r} does not exist (not a models:/ or runs:/ URI either)")
    found = read_artifact(path)
    return EncoderSource(found.tensors, found.cfg, {"uri": str(path.resolve())})
