"""The encoder artifact: the weights and the config a run hands on, one writer and one reader.

An artifact is a folder holding::

    encoder.safetensors   the encoder's state dict (fp32), with metadata: method, encoder,
                          in_chans, image_size and what the writer adds (step, finetuned)
    config.yaml           the run config it was trained with (architecture, image size, channels)

Every checkpoint holds one (written by rank 0), the registered MLflow model carries its two files,
and everything that reads an encoder goes through :func:`read_artifact`: warm start, ``ssl-dist
finetune`` and ``knn``, the retrain probe, the quality bench, MLflow model logging.

Trust boundary: weights are read with ``safetensors`` only. A folder that offers pickled weights
instead (``.pt``, ``.pth``, ``.pkl``, ``.bin``, ``.ckpt``), or a file named
``encoder.safetensors`` that is not safetensors (a renamed pickle), is refused with a
:class:`~ssl_dist.config.ConfigError`; nothing is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import yaml
from pydantic import ValidationError
from torch import Tensor, nn

from ssl_dist.atomic import write_atomic
from ssl_dist.config import Config, ConfigError, _format_error, to_yaml
from ssl_dist.models import build_encoder as build_architecture

ENCODER = "encoder.safetensors"
CONFIG = "config.yaml"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
"""Weight files that only unpickling could read: refused."""


# ---------------------------------------------------------------- writing


def encoder_state(full_state: dict[str, Tensor], prefix: str = "encoder.") -> dict[str, Tensor]:
    """The online encoder's tensors from a full method state dict, contiguous fp32 copies."""
    out = {
        k[len(prefix) :]: v.detach().float().contiguous().clone()
        for k, v in full_state.items()
        if k.startswith(prefix)
    }
    if not out:
        raise ValueError(f"no '{prefix}*' tensors in the state dict")
    return out


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file, written atomically."""
    write_atomic(path, safetensors.torch.save(tensors, metadata=metadata))


def write_artifact(directory: Path, tensors: dict[str, Tensor], cfg: Config, **extra: str) -> None:
    """Write ``encoder.safetensors`` (with `cfg`'s metadata and `extra`) and ``config.yaml``
    into `directory`, each atomically."""
    metadata = {
        "method": cfg.method.name,
        "encoder": cfg.model.encoder,
        "in_chans": str(cfg.data.channels),
        "image_size": str(cfg.data.image_size),
        **extra,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / ENCODER, tensors, metadata)
    write_atomic(directory / CONFIG, to_yaml(cfg))


# ---------------------------------------------------------------- reading


@dataclass
class Artifact:
    """An encoder's weights and the config it was trained with."""

    tensors: dict[str, Tensor]
    """The encoder's state dict (fp32), as read from ``encoder.safetensors``."""
    cfg: Config
    """The run config (``config.yaml``): encoder architecture, image size, channels."""

    def build_encoder(self) -> nn.Module:
        return build_encoder(self.cfg, self.tensors)


def _refuse(path: Path | str, why: str) -> ConfigError:
    return ConfigError(f"refusing to load {path}: {why}; only safetensors weights are loaded")


def read_weights(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file; anything else (a renamed pickle) is refused."""
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception:  # SafetensorError (bad header), OSError...: never fall back to pickle
        raise _refuse(path, "it is not a valid safetensors file") from None
    if not tensors:
        raise _refuse(path, "it holds no tensors")
    return tensors


def read_config(path: Path) -> Config:
    try:
        return Config.model_validate(yaml.safe_load(Path(path).read_text()))
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


def _as_folder(path: Path) -> Path:
    if path.is_dir():
        return path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse(path, "it is a pickled weights file")
    if path.name == ENCODER:
        return path.parent  # its config.yaml must sit beside it
    raise ConfigError(f"{path} is not a folder holding {ENCODER} and {CONFIG}")


def read_artifact(root: str | Path) -> Artifact:
    """Find ``encoder.safetensors`` and ``config.yaml`` under `root` (a checkpoint, a downloaded
    MLflow model or run artifact; searched recursively) and read them.

    The config beside the weights is preferred; otherwise the one config file in the tree.

    Raises:
        ConfigError: no weights (pickled ones are named and refused), no or an invalid config,
            several candidates at the same depth.
    """
    root = _as_folder(Path(root))
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
    cfg = read_config(config)  # before the weights: a cheap check first
    return Artifact(read_weights(weights), cfg)


# ---------------------------------------------------------------- building


def build_encoder(cfg: Config, tensors: dict[str, Tensor]) -> nn.Module:
    """`cfg`'s encoder architecture holding `tensors` (strict: every key, every shape)."""
    encoder = build_architecture(cfg.model, cfg.data.channels, cfg.data.image_size)
    try:
        encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"the weights do not fit the {cfg.model.encoder} encoder of the config: {first}"
        ) from None
    return encoder
