"""The encoder artifact (one writer, one reader, one builder), atomic writes, the manifest digest
and the warm start the driver resolves and hands to the model builder as tensors."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ssl_dist.artifact import (
    CONFIG,
    ENCODER,
    encoder_state,
    read_artifact,
    write_artifact,
)
from ssl_dist.atomic import atomic_file, write_atomic
from ssl_dist.config import Config, ConfigError, load_config
from ssl_dist.data.shards import Manifest, manifest_sha256, read_manifest
from ssl_dist.models import build_encoder
from ssl_dist.train.driver import warm_start
from ssl_dist.train.parts import build_model

pytestmark = pytest.mark.unit

RECIPES = Path(__file__).resolve().parents[2] / "launch" / "recipes"


def tiny(*overrides: str) -> Config:
    return load_config(RECIPES / "tiny.yaml", list(overrides))


def weights(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    return {k: v.detach().float().clone() for k, v in encoder.state_dict().items()}


# ---------------------------------------------------------------- the artifact


def test_written_artifact_reads_back_and_builds(tmp_path):
    cfg = tiny()
    tensors = weights(cfg, 1)
    write_artifact(tmp_path, tensors, cfg, step="7")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ENCODER, CONFIG])  # no temp
    found = read_artifact(tmp_path)
    assert found.cfg == cfg
    assert found.tensors.keys() == tensors.keys()
    assert all(torch.equal(found.tensors[k], tensors[k]) for k in tensors)
    with safe_open(str(tmp_path / ENCODER), "pt") as f:
        meta = f.metadata()
    assert meta == {
        "method": cfg.method.name,
        "encoder": cfg.model.encoder,
        "step": "7",
        "in_chans": str(cfg.data.channels),
        "image_size": str(cfg.data.image_size),
    }
    encoder = found.build_encoder()
    assert all(torch.equal(encoder.state_dict()[k].float(), tensors[k]) for k in tensors)
    # The reader finds the artifact inside a downloaded tree and from the weights file too.
    nested = tmp_path / "download" / "model" / "artifacts"
    nested.mkdir(parents=True)
    write_artifact(nested, tensors, cfg)
    assert read_artifact(tmp_path / "download").tensors.keys() == tensors.keys()
    assert read_artifact(nested / ENCODER).cfg == cfg


def test_encoder_state_takes_the_online_encoder_as_fp32_copies():
    full = {"encoder.w": torch.ones(2, dtype=torch.bfloat16), "head.w": torch.zeros(1)}
    out = encoder_state(full)
    assert list(out) == ["w"] and out["w"].dtype == torch.float32
    assert encoder_state(full, prefix="").keys() == full.keys()
    with pytest.raises(ValueError, match="no 'momentum.\\*' tensors"):
        encoder_state(full, prefix="momentum.")


class _Payload:
    """Unpickling this creates `marker`: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["renamed-pickle", "only-pickles", "no-config", "two"])
def test_the_reader_refuses_what_it_cannot_trust(tmp_path, kind):
    cfg = tiny()
    marker = tmp_path / "unpickled"
    d = tmp_path / "artifact"
    d.mkdir()
    if kind == "renamed-pickle":
        (d / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json")))
        (d / ENCODER).write_bytes(pickle.dumps(_Payload(marker)))
        needle = "not a valid safetensors file"
    elif kind == "only-pickles":
        torch.save({"w": _Payload(marker)}, d / "model.pt")
        needle = r"only pickled weights \(model.pt\)"
    elif kind == "no-config":
        write_artifact(d, weights(cfg, 0), cfg)
        (d / CONFIG).unlink()
        needle = "but no config.yaml"
    else:
        for sub in ("a", "b"):
            (d / sub).mkdir()
            write_artifact(d / sub, weights(cfg, 0), cfg)
        needle = "several encoder.safetensors files"
    with pytest.raises(ConfigError, match=needle):
        read_artifact(d)
    assert not marker.exists()


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg = tiny()
    write_artifact(tmp_path, weights(cfg, 0), cfg)
    wider = cfg.model_copy(deep=True)
    wider.model.widths = [w * 2 for w in cfg.model.widths]
    (tmp_path / CONFIG).write_text(json.dumps(wider.model_dump(mode="json")))
    with pytest.raises(ConfigError, match="do not fit"):
        read_artifact(tmp_path).build_encoder()


# ---------------------------------------------------------------- atomic writes


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "results.json"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer died")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


# ---------------------------------------------------------------- the manifest digest


def test_the_manifest_digest_is_of_the_file_bytes(tmp_path):
    manifest = Manifest(
        source="digits",
        classes=["0", "1"],
        image_size=(8, 8),
        channels=1,
        samples_per_shard=10,
        seed=0,
        mean=[0.5],
        std=[0.25],
        splits={},
    )
    path = tmp_path / "manifest.json"
    path.write_text(manifest.model_dump_json(indent=2))
    before = manifest_sha256(str(path))
    assert before == hashlib.sha256(path.read_bytes()).hexdigest()
    # The same manifest serialised differently is other bytes: another digest.
    path.write_text(manifest.model_dump_json())
    assert read_manifest(tmp_path) == manifest and manifest_sha256(str(path)) != before
    with pytest.raises(OSError):
        manifest_sha256(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------- warm start


def test_warm_start_is_read_by_the_driver_and_given_to_the_builder_as_tensors(tmp_path):
    cfg = tiny("method.name=moco_v3")
    source = weights(cfg, 123)
    write_artifact(tmp_path / "source", source, cfg)
    assert warm_start(cfg) is None
    cfg.model.init_from = str(tmp_path / "source")
    tensors = warm_start(cfg)
    assert tensors is not None and tensors.keys() == source.keys()
    method = build_model(cfg, tensors)
    online = method.encoder.state_dict()
    assert all(torch.equal(online[k].float(), source[k]) for k in source)
    momentum = [t for t, o in method.momentum_pairs() if o is method.encoder]
    assert momentum, "moco_v3 keeps a momentum encoder"
    assert all(torch.equal(momentum[0].state_dict()[k].float(), source[k]) for k in source)
    with pytest.raises(ValueError, match="pass its weights"):
        build_model(cfg)  # init_from set, weights not passed: never read here


def test_a_warm_start_that_does_not_fit_is_refused_by_the_driver(tmp_path):
    cfg = tiny()
    other = cfg.model_copy(deep=True)
    other.model.widths = [w * 2 for w in cfg.model.widths]
    write_artifact(tmp_path / "source", weights(other, 0), other)
    cfg.model.init_from = str(tmp_path / "source")
    with pytest.raises(ConfigError, match=r"model.init_from=.*do not fit"):
        warm_start(cfg)
