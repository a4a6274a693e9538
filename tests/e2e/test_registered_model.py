"""The registered encoder loads and predicts where ssl-dist cannot be imported: a downstream
team's environment with MLflow, torch, timm and safetensors, but not this project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from ssl_dist import tracking
from ssl_dist.config import load_config
from ssl_dist.data.shards import write_shards
from ssl_dist.data.sources import digits
from ssl_dist.train.checkpoint import STATE, TrainState
from ssl_dist.train.driver import finish
from tests.unit.test_finetune import RECIPES, init_tensors, write_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter with the project made unreachable before anything is imported:
# its folder off sys.path and the editable install's import hook off sys.meta_path.
OUTSIDE = """
import importlib.util, json, sys
project = sys.argv[1]
sys.path[:] = [p for p in sys.path if p not in ("", ".", project)]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in type(f).__module__]
for name in list(sys.modules):
    if name.startswith("__editable__"):
        del sys.modules[name]
assert importlib.util.find_spec("ssl_dist") is None, "ssl_dist is still importable"
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[2])
x = np.load(sys.argv[3])
np.save(sys.argv[4], model.predict(x))
print(json.dumps({"ssl_dist": "ssl_dist" in sys.modules}))
"""


def test_registered_model_loads_without_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "digits"
    write_shards(digits(), data, samples_per_shard=400)
    cfg = load_config(
        RECIPES / "tiny.yaml",
        [
            f"data.manifest={data}/manifest.json",
            f"run.storage_path={tmp_path}/runs",
            "tracking.model_name=portable",
            "tracking.alias=champion",
        ],
    )
    ckpt = write_checkpoint(tmp_path / "ckpt", init_tensors(cfg), cfg)
    uri = tracking.resolve_uri(None, cfg.run.storage_path)
    run_id = tracking.find_or_create_run(cfg, uri)
    (ckpt / STATE).write_text(TrainState(step=4, mlflow_run_id=run_id).to_json())
    done = finish(cfg, ckpt, {"step": 4, "total_steps": 4})  # the driver's end of a run
    assert done is not None and done["version"]
    model_uri = "models:/portable@champion"

    # The model folder lists real, pinned requirements, not this project, and ships its code.
    with tracking.mlflow_uris(uri):
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model"))
    reqs = Path(local, "requirements.txt").read_text().split()
    assert not [r for r in reqs if r.startswith(("ssl-dist", "ssl_dist"))], reqs
    for pkg in tracking.MODEL_REQUIREMENTS:
        assert any(r.startswith(f"{pkg}==") for r in reqs), (pkg, reqs)
    conf = yaml.safe_load(Path(local, "MLmodel").read_text())
    assert conf["flavors"]["python_function"]["code"] is not None
    # The driver's val sample reached tracking: an input example and the signature.
    assert conf["signature"]["inputs"] and conf["signature"]["outputs"]
    assert Path(local, conf["saved_input_example_info"]["artifact_path"]).is_file()
    assert Path(local, "code", "ssl_dist_encoders.py").is_file()

    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    x = rng.standard_normal((5, cfg.data.channels, size, size)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with tracking.mlflow_uris(uri):
        inside = mlflow.pyfunc.load_model(model_uri).predict(x)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = uri
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            OUTSIDE,
            str(PROJECT),
            model_uri,
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ssl_dist": False}
    outside = np.load(tmp_path / "y.npy")
    assert outside.shape == inside.shape == (5, 8)
    np.testing.assert_allclose(outside, inside, rtol=1e-5, atol=1e-6)
