"""`finetune --mode full`: encoder + head trained on two Ray Train workers through DeepSpeed."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_dist import tracking
from ssl_dist.artifact import ENCODER, read_artifact, write_artifact
from ssl_dist.evaluate.finetune import EXPERIMENT, run_finetune
from ssl_dist.models import build_encoder
from ssl_dist.train.finetune import CLASSIFIER, RESULTS

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_full_finetune_two_workers_learns_and_is_logged(
    local_ray, tiny_cfg, digits_shards, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg("zero.stage=1")  # the tiny encoder (4-8-8-8 channels, 16 px), ZeRO-1
    torch.manual_seed(cfg.run.seed)
    init = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size).state_dict()
    src = tmp_path / "source"
    src.mkdir()
    write_artifact(src, {k: v.float() for k, v in init.items()}, cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    r = run_finetune(
        str(src),
        digits_shards,
        "full",
        tracking_uri=uri,
        epochs=2,
        lr=0.3,
        num_workers=2,
        storage_path=str(tmp_path / "runs"),
    )
    print(
        f"\nfull fine-tune of the tiny encoder, 2 workers x 2 epochs ({r['steps']} steps): "
        f"top-1 {r['top1']:.1%}, top-5 {r['top5']:.1%}, {r['seconds']:.0f}s"
    )

    # 1438 train samples in 15 shards of <= 100: each rank is sure of 7 shards (638 samples),
    # 39 batches of 16 per epoch.
    assert r["world_size"] == 2 and r["steps"] == 2 * 39 and r["global_batch"] == 32
    assert (r["n_train"], r["n_val"]) == (1438, 359)
    assert r["top1"] > 0.3 and r["top5"] >= r["top1"]  # 10 classes: chance is 0.1
    out = Path(r["checkpoint"])
    assert json.loads((out / RESULTS).read_text())["top1"] == pytest.approx(r["top1"])
    assert (out / ENCODER).is_file()
    tuned = read_artifact(out).tensors
    read_artifact(out).build_encoder()  # the fine-tuned encoder artifact, ready to hand on
    assert any(not torch.equal(tuned[k], init[k].float()) for k in tuned)  # the encoder moved
    assert {k.split(".")[0] for k in load_file(str(out / CLASSIFIER))} == {"encoder", "head"}

    client = tracking.client(uri)
    run = client.get_run(r["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.data.metrics["top1"] == pytest.approx(r["top1"])
    assert run.data.params["mode"] == "full" and run.data.params["num_workers"] == "2"
    assert run.data.tags["ssl_dist.source_uri"] == str(src.resolve())
