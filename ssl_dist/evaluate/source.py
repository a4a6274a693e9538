"""Where a pretrained encoder comes from: a registered model, a run's artifact or a checkpoint.

`load_source` accepts

* ``models:/<name>@<alias>`` and ``models:/<name>/<version>``: a registered model version (its
  pyfunc model folder holds ``encoder.safetensors`` and ``config.yaml``); the lineage names the
  model, the version and the run that produced it;
* ``models:/<model id>``: an MLflow 3 logged model;
* ``runs:/<run id>/<path>``: an artifact (folder) of an MLflow run;
* a local directory: an ssl-dist checkpoint (``encoder.safetensors`` + ``config.yaml``).

Trust boundary: weights are read with ``safetensors.torch.load_file`` only. A tree that offers
pickled weights instead (``.pt``, ``.pth``, ``.pkl``, ``.bin``, ``.ckpt``), or a file named
``encoder.safetensors`` that is not safetensors (a renamed pickle), is refused with a
:class:`~ssl_dist.config.ConfigError`; nothing is ever unpickled.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from torch import Tensor

from ssl_dist.config import Config, ConfigError, _format_error
from ssl_dist.tracking import mlflow_uris
from ssl_dist.train.checkpoint import ENCODER

CONFIG = "config.yaml"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
"""Weight files that only unpickling could read: refused."""
DEFAULT_STORAGE = "work/runs"
"""Where the default sqlite tracking store lives (``<storage>/mlflow.db``), as for pretraining."""


@dataclass
class EncoderSource:
    """A pretrained encoder: its weights, the config it was trained with, and where it is from."""

    tensors: dict[str, Tensor]
    """The encoder's state dict (fp32), as read from ``encoder.safetensors``."""
    cfg: Config
    """The pretraining config (``config.yaml``): encoder architecture, image size, channels."""
    lineage: dict[str, str] = field(default_factory=dict)
    """``uri`` always; ``model_name``, ``model_version``, ``run_id`` when known."""


def _refuse(path: Path | str, why: str) -> ConfigError:
    return ConfigError(f"refusing to load {path}: {why}; only safetensors weights are loaded")


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception:  # SafetensorError (bad header), OSError...: never fall back to pickle
        raise _refuse(path, "it is not a valid safetensors file") from None
    if not tensors:
        raise _refuse(path, "it holds no tensors")
    return tensors


def _read_config(path: Path) -> Config:
    try:
        tree = yaml.safe_load(path.read_text())
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_format_error(e)}") from None
    except (yaml.YAMLError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not an ssl-dist config: {first}") from None


def _pick(found: list[Path], root: Path, what: str) -> Path | None:
    """The shallowest of `found`; several at that depth is ambiguous."""
    if not found:
        return None
    depth = min(len(p.relative_to(root).parts) for p in found)
    top = sorted(p for p in found if len(p.relative_to(root).parts) == depth)
    if len(top) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in top[:4])
        raise ConfigError(f"{root} holds several {what} files ({names}); point at one folder")
    return top[0]


def _as_tree(path: Path) -> Path:
    if path.is_dir():
        return path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse(path, "it is a pickled weights file")
    if path.name == ENCODER:
        return path.parent  # its config.yaml must sit beside it
    raise ConfigError(f"{path} is not a folder holding {ENCODER} and {CONFIG}")


def read_tree(root: Path) -> tuple[dict[str, Tensor], Config]:
    """Find ``encoder.safetensors`` and ``config.yaml`` under `root` (recursively) and read them.

    The config beside the weights is preferred; otherwise the one config file in the tree.
    """
    root = _as_tree(Path(root))
    weights = _pick(list(root.rglob(ENCODER)), root, ENCODER)
    if weights is None:
        pickles = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
        )
        if pickles:
            names = ", ".join(str(p.relative_to(root)) for p in pickles[:4])
            raise _refuse(root, f"it has no {ENCODER}, only pickled weights ({names})")
        raise ConfigError(f"{root} holds no {ENCODER}: not an ssl-dist encoder")
    beside = weights.parent / CONFIG
    config = beside if beside.is_file() else _pick(list(root.rglob(CONFIG)), root, CONFIG)
    if config is None:
        raise ConfigError(f"{root} holds {ENCODER} but no {CONFIG} (the pretraining config)")
    cfg = _read_config(config)  # before the weights: a cheap check first
    return _read_weights(weights), cfg


_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[^/@]+)/?$")
_MODEL_ID = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)/?$")
_RUN = re.compile(r"^runs:/(?P<run_id>[^/]+)(?:/(?P<path>.*))?$")


def _not_found(e: Exception) -> bool:
    code = getattr(e, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def _resolve_model(client: Any, uri: str) -> tuple[str, dict[str, str]]:
    """The exact ``models:/name/version`` to download and the lineage of a models:/ URI."""
    from mlflow.exceptions import MlflowException

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
    import mlflow
    from mlflow.exceptions import MlflowException

    from ssl_dist import tracking

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
    with tempfile.TemporaryDirectory(prefix="ssl-dist-source-") as tmp, mlflow_uris(tracking_uri):
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
        tensors, cfg = read_tree(Path(local))  # read into memory before tmp goes
    return EncoderSource(tensors, cfg, lineage)


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
        from ssl_dist import tracking

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
    tensors, cfg = read_tree(path)
    return EncoderSource(tensors, cfg, {"uri": str(path.resolve())})
