"""Typed configuration for a whole run.

One pydantic model per component, ``extra="forbid"`` everywhere so that a misspelt key is an
error, a docstring per field, and defaults that run on one CPU machine. A config is loaded from a
YAML recipe plus dotted overrides (``optim.lr=0.3``); :class:`ConfigError` carries one readable
message naming the field and what is allowed, which the CLI turns into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from ssl_dist.config.base import _Strict
from ssl_dist.config.data import DamagePolicy as DamagePolicy
from ssl_dist.config.data import DataConfig as DataConfig
from ssl_dist.config.data import ViewsConfig as ViewsConfig
from ssl_dist.config.methods import DinoConfig as DinoConfig
from ssl_dist.config.methods import MaskedConfig as MaskedConfig


class ConfigError(ValueError):
    """Bad user input: a recipe that cannot be read or a value that is not allowed."""


class ModelConfig(_Strict):
    encoder: Literal["thin_resnet", "resnet18", "resnet50", "vit_tiny", "vit_small"] = "thin_resnet"
    """Backbone: timm models; `thin_resnet` is a small ResNet for CPU with `widths`."""
    widths: tuple[int, ...] = (16, 32, 64, 128)
    """Channel widths of the thin ResNet's four stages."""
    small_stem: bool = True
    """3x3 stride-1 stem without max-pool, for 28-32 px images."""
    proj_hidden: int = Field(512, ge=8)
    """Hidden width of the projector MLP."""
    proj_dim: int = Field(128, ge=8)
    """Output width of the projector (the embedding the loss sees)."""
    proj_layers: int = Field(2, ge=2, le=3)
    """Linear layers in the projector."""
    pred_hidden: int = Field(512, ge=8)
    """Hidden width of MoCo v3's predictor."""
    pred_last_bn: bool = False
    """MoCo v3: end the predictor with an affine-free BN (the reference does for its ViTs)."""
    vit_heads: int | None = Field(None, ge=1)
    """Attention heads of a ViT encoder (None: timm's, 6 for vit_small; MoCo v3's ViT-S has
    12)."""
    vit_depth: int | None = Field(None, ge=1)
    """Transformer blocks of a ViT encoder (None: timm's 12). Fewer make a small, quick ViT for
    short CPU runs."""
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    """Residual blocks per stage of the thin ResNet (2, 2, 2, 2 is ResNet-18's depth)."""
    zero_init_residual: bool = True
    """Start every residual block as the identity (last BN gamma = 0), as SimCLR and MoCo do."""
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm (GPU only; torch refuses it on CPU tensors)."""
    init_from: str | None = None
    """Warm start: encoder weights from `models:/name/version`, `models:/name@alias`,
    `runs:/id/path` or a checkpoint dir (safetensors only); heads start fresh."""


class MethodConfig(_Strict):
    name: Literal["simclr", "moco_v2", "moco_v3", "byol", "rotation", "mae", "simmim", "dino"] = (
        "simclr"
    )
    """Which self-supervised method to train."""
    temperature: float = Field(0.2, gt=0, le=10)
    """Softmax temperature of the contrastive loss."""
    gather: bool = True
    """Gather negatives / keys across all ranks (off only for ablations)."""
    rotation_weight: float = Field(0.0, ge=0)
    """SimCLR: weight of an auxiliary rotation-prediction loss (0: off). Each image, both its
    views alike, is turned by a random multiple of 90 degrees and a head on the backbone
    features predicts which (:mod:`ssl_dist.methods.simclr`)."""
    momentum: float = Field(0.99, ge=0, le=1)
    """MoCo: base momentum of the key encoder."""
    momentum_final: float = Field(1.0, ge=0, le=1)
    """MoCo v3: momentum at the end of training (cosine schedule from `momentum`)."""
    queue_size: int = Field(4096, ge=1)
    """MoCo v2: number of keys in the queue; must be a multiple of the global batch."""
    shuffle_bn: bool = True
    """MoCo v2: shuffle the key batch across ranks before the key encoder (shuffle-BN)."""
    masked: MaskedConfig = MaskedConfig()
    """`mae` / `simmim`: mask ratio, pixel target and decoder (``method.masked.mask_ratio``)."""
    dino: DinoConfig = DinoConfig()
    """`dino`: head, temperatures, centre and multi-crop (``method.dino.teacher_temp``)."""


class OptimConfig(_Strict):
    name: Literal["lars", "sgd", "adamw"] = "lars"
    """Optimizer; LARS is timm's, with BN and bias excluded from decay and adaptation."""
    lr: float = Field(0.3, gt=0)
    """Base learning rate at `base_batch`; scaled by `lr_scaling` to the global batch."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    """How the learning rate follows the global batch."""
    base_batch: int = Field(256, ge=1)
    """Batch size at which `lr` is given."""
    weight_decay: float = Field(1e-6, ge=0)
    """Weight decay (not applied to BN and bias parameters)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD / LARS momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = Field(0.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""


class ZeroConfig(_Strict):
    stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training precision. ``bf16``: mixed precision by autocast, fp32 weights, optimizer state
    and momentum encoders (:mod:`ssl_dist.precision`). ``auto``: bf16 where the device computes
    it natively (a GPU with bf16, a CPU with AVX-512 BF16 / AMX), else fp32."""
    offload_optimizer: bool = False
    """Offload optimizer state to CPU memory (ZeRO 1-3)."""

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, v: Any) -> Any:
        if v == "fp16":
            raise ValueError(
                "fp16 is not supported (it needs loss scaling and 16-bit momentum encoders lose "
                "their EMA updates); use bf16 (autocast, fp32 weights) or auto"
            )
        return v


class ScalingConfig(_Strict):
    num_workers: int | tuple[int, int] = 2
    """Ray Train workers: a fixed count, or [min, max] for an elastic run."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs reserved per worker; also the torch thread count inside it."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """Use one GPU per worker: `auto` uses it when the cluster has GPUs."""
    elastic_policy: Literal["keep_per_worker_batch", "keep_global_batch"] = "keep_per_worker_batch"
    """Elastic runs: rescale LR with the new global batch, or keep it by gradient accumulation."""

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError("must be at least 1")
        elif not 1 <= v[0] <= v[1]:
            raise ValueError("[min, max] needs 1 <= min <= max")
        return v


class TrackingConfig(_Strict):
    enabled: bool = True
    """Log to MLflow from rank 0."""
    uri: str | None = None
    """MLflow tracking URI (or $MLFLOW_TRACKING_URI); default: sqlite `<storage_path>/mlflow.db`."""
    experiment: str = "ssl-dist"
    """MLflow experiment name."""
    model_name: str = "ssl-encoder"
    """Registered model name for the final encoder."""
    alias: str = "latest"
    """Alias set on the registered version. `latest` is MLflow's own: `models:/name@latest` is
    always the newest version, so nothing is set for it."""
    knn_every_epochs: int = Field(1, ge=0)
    """kNN accuracy on the val split every this many epochs and at the end (0: never)."""
    flush_timeout_s: float = Field(60.0, gt=0)
    """At the end of a worker's run, how long rank 0 keeps trying to send what is buffered
    (the server may be down); what is left is reported in a warning."""
    knn_bank: int = Field(10000, ge=1)
    """Most train samples in the kNN bank."""
    system_metrics_s: float = Field(10.0, ge=0)
    """Seconds between samples of MLflow's system-metrics monitor (CPU, memory, disk, network,
    GPU use and memory), one monitor per node, logged as ``system/<host name>/...``; 0: off."""


class RunConfig(_Strict):
    name: str = "run"
    """Run name: the same name continues a run, a new one starts fresh."""
    storage_path: str = "work/runs"
    """Where Ray keeps checkpoints: local dir, shared filesystem, or s3://."""
    seed: int = 0
    """Seed for data order, augmentation and initialisation."""
    epochs: int = Field(1, ge=1)
    """Passes over the training split (exact mode) or epochs of `steps_per_epoch`."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    stop_at_step: int | None = Field(None, ge=1)
    """End this invocation after this step with a checkpoint; the schedule still spans the whole
    run, and running the same name again continues (time-boxed jobs, tests)."""
    time_limit_s: float | None = Field(None, gt=0)
    """Wall-clock seconds for this invocation, counted from when the driver builds the trainer
    (worker start-up included): at the first step past it every worker stops with a checkpoint,
    as with `stop_at_step` (the schedule still spans the whole run; running the same name again
    continues). For jobs with a hard time slot and time-boxed benchmarks."""
    checkpoint_every: int = Field(100, ge=1)
    """Save a checkpoint every this many steps (and at the end)."""
    num_to_keep: int = Field(2, ge=1)
    """Checkpoints Ray keeps."""
    max_failures: int = Field(0, ge=-1)
    """Restarts of the worker group after a failure (-1: unlimited)."""
    ray_address: str | None = None
    """`auto`, `ray://host:port`, or empty to start a local Ray instance."""
    collective_timeout_s: float = Field(600.0, gt=0)
    """Timeout of collectives: a hung rank fails the group instead of blocking it."""
    log_every: int = Field(10, ge=1)
    """Steps between metric reports."""


class RetrainConfig(_Strict):
    """`ssl-dist retrain`: the scheduled champion / challenger job."""

    data: str | None = None
    """Newest data: a manifest path or a glob of them (the newest by modification time wins);
    default `data.manifest`."""
    eval_data: str | None = None
    """The fixed evaluation shard set (dir or manifest) both encoders are probed on."""
    champion_alias: str = "champion"
    """Registry alias of the encoder in production."""
    challenger_alias: str = "challenger"
    """Alias set on each newly trained encoder."""
    margin: float = Field(0.005, ge=0, le=1)
    """The challenger must beat the champion's probe top-1 by this much (0.005 = 0.5 points)."""
    warm_start: bool = True
    """Start from the champion's encoder (else from scratch)."""
    lock_dir: str | None = None
    """Where the job's lock file lives: a local or shared filesystem path (default
    `run.storage_path/locks`; required when the storage is object storage)."""
    lock_ttl_s: float = Field(86400.0, gt=0)
    """A lock older than this is stale (its holder is presumed dead) and is taken over."""


class Config(_Strict):
    """A whole run."""

    data: DataConfig = DataConfig()
    views: ViewsConfig = ViewsConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    zero: ZeroConfig = ZeroConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    run: RunConfig = RunConfig()
    retrain: RetrainConfig = RetrainConfig()


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see --print-config for all keys)"
        elif e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"must be one of {e['ctx']['expected']}"
        lines.append(f"{loc}: {msg} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is read as YAML (numbers, lists, booleans, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the defaults), apply dotted overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = loaded
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"optim.lr": 0.3, ...}``: for MLflow params and the recorded config."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", cfg.model_dump(mode="json"))
    return out
