"""`ssl-dist finetune`: the linear probe, the sources it loads from, and what it refuses."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_dist import tracking
from ssl_dist.artifact import CONFIG, ENCODER, encoder_state, write_artifact
from ssl_dist.config import Config, ConfigError, load_config, to_yaml
from ssl_dist.data.shards import write_shards
from ssl_dist.data.sources import digits
from ssl_dist.evaluate.finetune import EXPERIMENT, run_finetune
from ssl_dist.evaluate.probe import WD_GRID, linear_probe, probe_features
from ssl_dist.evaluate.source import EncoderSource, load_source
from ssl_dist.models import build_encoder
from ssl_dist.train import local, parts

RECIPES = Path(__file__).resolve().parents[2] / "launch" / "recipes"

MODEL_CODE = """
import mlflow
from mlflow.pyfunc import PythonModel


class Encoder(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Encoder())
"""


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_shards(digits(), out, samples_per_shard=200)
    return out


def tiny_cfg(digits_dir: Path) -> Config:
    return load_config(RECIPES / "tiny.yaml", [f"data.manifest={digits_dir}/manifest.json"])


def init_tensors(cfg: Config) -> dict[str, torch.Tensor]:
    """The encoder as the run that `cfg` describes starts it (see checkpoint_knn)."""
    torch.manual_seed(cfg.run.seed)
    encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def write_checkpoint(d: Path, tensors: dict[str, torch.Tensor], cfg: Config) -> Path:
    d.mkdir(parents=True)
    write_artifact(d, tensors, cfg)
    return d


# ------------------------------------------------------------------ the probe itself


@pytest.mark.unit
def test_probe_is_deterministic_and_chooses_from_the_grid():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(7, 16, generator=g) * 2
    y = torch.arange(7).repeat(60)
    x = centres[y] + torch.randn(len(y), 16, generator=g)
    vy = torch.arange(7).repeat(20)
    vx = centres[vy] + torch.randn(len(vy), 16, generator=g)
    a = probe_features(x, y, vx, vy, 7)
    b = probe_features(x, y, vx, vy, 7)
    assert a == b
    assert a["weight_decay"] in WD_GRID and set(a["holdout_top1"]) == {str(w) for w in WD_GRID}
    assert a["top1"] > 0.8 and a["top5"] >= a["top1"]
    assert (a["n_train"], a["n_val"], a["feature_dim"]) == (420, 140, 16)
    # Features that carry no class information: chance level, not more.
    noise = probe_features(torch.randn(420, 16, generator=g), y, torch.randn(140, 16), vy, 7)
    assert noise["top1"] < 0.35


@pytest.fixture(scope="module")
def pretrained(digits_dir, tmp_path_factory) -> tuple[Path, Config]:
    """80 SimCLR steps of a small ResNet on 16 px digits (run_local, ~15 s), as a checkpoint."""
    cfg = load_config(
        RECIPES / "digits-demo.yaml",
        [
            f"data.manifest={digits_dir}/manifest.json",
            "data.image_size=16",
            "data.batch_size=64",
            "model.widths=[8, 16, 32, 64]",
            "model.depths=[1, 1, 1, 1]",
            "run.epochs=100",
            "run.max_steps=80",
        ],
    )
    built = []

    def keep(c: Config):  # the real build_model; kept to read the trained encoder afterwards
        built.append(parts.build_model(c))
        return built[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local, "build_model", keep)
        result = local.run_local(cfg, knn=False)
    assert result.steps == 80 and len(built) == 1
    d = tmp_path_factory.mktemp("pretrained") / "checkpoint"
    write_checkpoint(d, encoder_state(built[0].state_dict()), cfg)
    return d, cfg


@pytest.mark.slow
def test_linear_probe_of_pretrained_encoder_beats_its_init(pretrained, digits_dir):
    d, cfg = pretrained
    source = load_source(str(d))
    assert source.cfg == cfg and source.lineage == {"uri": str(d.resolve())}
    trained = linear_probe(source, digits_dir)
    init = linear_probe(EncoderSource(init_tensors(cfg), cfg, {}), digits_dir)
    print(
        f"\nlinear probe top-1 on digits val (16 px, 80 SimCLR steps): "
        f"{trained['top1']:.1%} pretrained (wd {trained['weight_decay']:g}) vs "
        f"{init['top1']:.1%} at init (wd {init['weight_decay']:g}); "
        f"top-5 {trained['top5']:.1%} vs {init['top5']:.1%}; "
        f"{trained['seconds']:.1f}s per probe"
    )
    assert (trained["n_train"], trained["n_val"]) == (1438, 359)
    assert trained["top5"] is not None and trained["top5"] >= trained["top1"]
    assert trained["top1"] > init["top1"] + 0.08


# ------------------------------------------------------------------ refused inputs


class _Payload:
    """Unpickling this creates `marker`: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_dist.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["torch-save-renamed", "pickle-renamed", "only-model-pt"])
def test_finetune_refuses_pickled_weights(tmp_path, digits_dir, kind):
    cfg = tiny_cfg(digits_dir)
    control, marker = tmp_path / "control", tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()  # the payload is live: unpickling it would leave the marker
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / CONFIG).write_text(to_yaml(cfg))
    if kind == "torch-save-renamed":
        torch.save({"stem.weight": _Payload(marker)}, d / ENCODER)
    elif kind == "pickle-renamed":
        (d / ENCODER).write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"stem.weight": _Payload(marker)}, d / "model.pt")
    r = _cli(
        "finetune",
        "--model",
        str(d),
        "--data",
        str(digits_dir),
        "--mode",
        "linear",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    )
    assert r.returncode == 2, r.stderr
    assert "refusing to load" in r.stderr and "only safetensors weights are loaded" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was logged


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "/nonexistent/shards"], "does not exist"),
        (["--mode", "partial"], "--mode must be one of"),
        (["--model", "s3://bucket/enc"], "use models:/name@alias"),
        (["--model", "models:/enc@champion"], "no MLflow database"),
        (["--model", "/nonexistent/ckpt"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, digits_dir, monkeypatch, capsys, args, needle):
    from ssl_dist import cli

    monkeypatch.chdir(tmp_path)  # the default store work/runs/mlflow.db does not exist here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg(digits_dir)
    d = write_checkpoint(tmp_path / "ckpt", init_tensors(cfg), cfg)
    given = {"--model": str(d), "--data": str(digits_dir), "--mode": "linear"}
    given.update(dict(zip(args[::2], args[1::2], strict=True)))
    monkeypatch.setattr(
        sys, "argv", ["ssl-dist", "finetune", *(x for kv in given.items() for x in kv)]
    )
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()  # no tracking store was created on the way


# ------------------------------------------------------------------ MLflow sources and tags


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Add type hints")
def test_registered_model_sources_lineage_and_tags(tmp_path, digits_dir, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_cfg(digits_dir)
    tensors = init_tensors(cfg)
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors, cfg)
    code = tmp_path / "encoder_model.py"
    code.write_text(MODEL_CODE)
    client = tracking.client(uri)
    exp = tracking.experiment_id(client, "ssl-dist", uri)
    with tracking.mlflow_uris(uri), mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(ckpt), "checkpoint")
        info = mlflow.pyfunc.log_model(
            name="encoder",
            python_model=str(code),
            pip_requirements=["torch"],
            artifacts={"encoder": str(ckpt / ENCODER), "config": str(ckpt / CONFIG)},
            registered_model_name="digits-encoder",
        )
    version = str(info.registered_model_version)
    client.set_registered_model_alias("digits-encoder", "champion", version)
    run_id = run.info.run_id

    for uri_form in ("models:/digits-encoder@champion", f"models:/digits-encoder/{version}"):
        src = load_source(uri_form, uri)
        assert src.lineage == {
            "uri": uri_form,
            "model_name": "digits-encoder",
            "model_version": version,
            "run_id": run_id,
        }
        assert src.cfg == cfg
        assert src.tensors.keys() == tensors.keys()
        assert all(torch.equal(src.tensors[k].float(), tensors[k].float()) for k in tensors)
        assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow's global URI was put back
    src = load_source(f"runs:/{run_id}/checkpoint", uri)
    assert src.lineage == {"uri": f"runs:/{run_id}/checkpoint", "run_id": run_id}
    with pytest.raises(ConfigError, match="no registered model version"):
        load_source("models:/digits-encoder@nope", uri)
    with pytest.raises(ConfigError, match="no registered model version"):
        load_source("models:/digits-encoder/99", uri)

    r = run_finetune("models:/digits-encoder@champion", digits_dir, "linear", tracking_uri=uri)
    assert r["mlflow_run_id"] is not None and r["model_version_tagged"]
    assert 0.1 < r["top1"] <= 1 and r["top5"] >= r["top1"]
    logged = client.get_run(r["mlflow_run_id"])
    assert client.get_experiment(logged.info.experiment_id).name == EXPERIMENT
    tags = logged.data.tags
    assert tags["ssl_dist.source_uri"] == "models:/digits-encoder@champion"
    assert tags["ssl_dist.source_model_name"] == "digits-encoder"
    assert tags["ssl_dist.source_model_version"] == version
    assert tags["ssl_dist.source_run_id"] == run_id
    assert logged.data.metrics["top1"] == pytest.approx(r["top1"])
    assert logged.data.params["mode"] == "linear"
    assert float(logged.data.params["weight_decay"]) == r["weight_decay"]
    mv = client.get_model_version("digits-encoder", version).tags
    assert float(mv["linear_top1"]) == pytest.approx(r["top1"], abs=1e-6)
    assert float(mv["linear_top5"]) == pytest.approx(r["top5"], abs=1e-6)
    assert mv["linear_data"] == str((digits_dir / "manifest.json").resolve())


@pytest.mark.unit
def test_tracking_down_does_not_fail_the_probe(tmp_path, digits_dir, monkeypatch):
    """An unreachable tracking server costs a warning and a None run id, not the result."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg(digits_dir)
    d = write_checkpoint(tmp_path / "ckpt", init_tensors(cfg), cfg)
    with pytest.warns(UserWarning, match="MLflow"):
        r = run_finetune(
            str(d), digits_dir, "linear", tracking_uri="http://127.0.0.1:9", log_timeout_s=20
        )
    assert r["mlflow_run_id"] is None and r["top1"] > 0.1
    assert r["source"] == {"uri": str(d.resolve())}


@pytest.mark.slow  # MLflow sqlite store, figures and model logging: ~5 s
def test_finishing_a_run_twice_registers_one_version(tmp_path, digits_dir, monkeypatch):
    """A job that crashed after registering its encoder and is run again (retrain after a
    crash) gets the same model version back, not a duplicate."""
    from ssl_dist.train.checkpoint import STATE, TrainState

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(
        RECIPES / "tiny.yaml",
        [
            f"data.manifest={digits_dir}/manifest.json",
            f"run.storage_path={tmp_path}/runs",
            "tracking.model_name=twice",
            "tracking.alias=candidate",
        ],
    )
    ckpt = write_checkpoint(tmp_path / "ckpt", init_tensors(cfg), cfg)
    run_id = tracking.find_or_create_run(cfg, tracking.resolve_uri(None, cfg.run.storage_path))
    (ckpt / STATE).write_text(TrainState(step=4, mlflow_run_id=run_id).to_json())
    first = tracking.finish_run(cfg, ckpt, {"total_steps": 4, "loss": 1.0})
    second = tracking.finish_run(cfg, ckpt, {"total_steps": 4, "loss": 1.0})
    assert first is not None and second is not None and first["run_id"] == run_id
    assert second["version"] == first["version"] and second["run_id"] == run_id
    client = tracking.client(tracking.resolve_uri(None, cfg.run.storage_path))
    assert len(client.search_model_versions("name = 'twice'")) == 1
    assert client.get_model_version_by_alias("twice", "candidate").version == first["version"]
