"""`pretrain` through Ray Train workers and DeepSpeed ZeRO on a local Ray instance."""

import json
from pathlib import Path

import pytest
import torch

from ssl_dist.artifact import ENCODER, read_artifact, read_weights, write_artifact
from ssl_dist.models import build_encoder
from ssl_dist.train.checkpoint import STATE
from ssl_dist.train.driver import pretrain
from ssl_dist.train.parts import build_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _final(result: tuple) -> Path:
    """The final checkpoint of a `pretrain` result (path, metrics)."""
    d = Path(result[0])
    assert (d / STATE).is_file() and (d / ENCODER).is_file()
    return d


# Every method once and every stage, not the full product: each fit costs about 25 s here, and
# the method x stage math is covered without Ray in tests/dist (plus moco_v2 / ZeRO-2 below).
# Rotation prediction is not a two-view method: it builds its own inputs (four rotations of
# one view) and trains through the same runtime and worker loop. DINO runs with multi-crop: the
# loader cuts 2 local crops of 8 px per image besides the 2 global ones. SimMIM, the masked task
# for ResNets, reads one crop per image.
METHOD_OVERRIDES = {
    "dino": [
        "method.dino.out_dim=64",
        "method.dino.hidden_dim=16",
        "method.dino.bottleneck_dim=8",
        "method.dino.local_crops=2",
        "method.dino.local_size=8",
    ],
    # MAE needs a ViT (4 px patches: 16 tokens, 4 visible); ZeRO-3 because its masked path reads
    # the encoder's position embedding and class token outside the encoder's own forward.
    "mae": [
        "model.encoder=vit_tiny",
        "model.vit_heads=3",
        "method.masked.decoder_dim=16",
        "method.masked.decoder_heads=2",
        "method.masked.decoder_depth=1",
    ],
}


@pytest.mark.parametrize(
    ("method", "stage"),
    [
        ("simclr", 0),
        ("moco_v3", 1),
        ("moco_v2", 3),
        ("byol", 2),
        ("rotation", 2),
        ("dino", 2),
        ("mae", 3),
        ("simmim", 1),
    ],
)
def test_pretrain_two_workers(local_ray, tiny_cfg, method, stage):
    cfg = tiny_cfg(
        f"method.name={method}",
        *METHOD_OVERRIDES.get(method, []),
        f"zero.stage={stage}",
        "run.max_steps=2",
        f"run.name={method}-z{stage}",
    )
    d = _final(pretrain(cfg))
    state = json.loads((d / STATE).read_text())
    assert state["step"] == 2 and state["world_size"] == 2
    weights = read_artifact(d).tensors
    read_artifact(d).build_encoder()  # the artifact: its config and weights fit (strict)
    assert all(torch.isfinite(v).all() for v in weights.values())
    init = build_model(cfg).encoder.state_dict()  # the run's init: same seed, same weights
    moved = [k for k in weights if not torch.equal(weights[k], init[k].float())]
    assert any("conv" in k or "blocks" in k for k in moved), f"{method}: the encoder did not move"


# MoCo v2 under ZeRO-2: queue, momentum encoder, partitioned optimizer and RNG all round-trip.
@pytest.mark.parametrize(("method", "stage"), [("moco_v2", 2)])
def test_resume_matches_uninterrupted(local_ray, tiny_cfg, method, stage):
    common = [
        f"method.name={method}",
        f"zero.stage={stage}",
        "run.max_steps=6",
        "run.checkpoint_every=100",
    ]
    straight = read_weights(_final(pretrain(tiny_cfg(*common, "run.name=straight"))) / ENCODER)
    first = _final(pretrain(tiny_cfg(*common, "run.name=split", "run.stop_at_step=3")))
    stopped = json.loads((first / STATE).read_text())
    assert stopped["step"] == 3 and stopped["stopped"] == "stop_at_step"
    last = _final(pretrain(tiny_cfg(*common, "run.name=split")))
    assert json.loads((last / STATE).read_text())["stopped"] is None
    resumed = read_weights(last / ENCODER)
    assert resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-6, atol=1e-7, msg=k)
    # And the run did move: the final weights differ from the step-3 ones.
    halfway = read_weights(first / ENCODER)
    assert any(not torch.equal(halfway[k], straight[k]) for k in straight)


def test_time_limit_stops_with_a_checkpoint(local_ray, tiny_cfg):
    """run.time_limit_s: a run planned far past the limit stops soon after it, on every
    worker at the same step, with a checkpoint to continue from."""
    import time

    limit = 20.0
    start = time.perf_counter()
    result = pretrain(
        tiny_cfg(
            "run.name=timed",
            "run.epochs=100000",
            "run.max_steps=100000",
            "run.checkpoint_every=100000",
            f"run.time_limit_s={limit}",
        )
    )
    wall = time.perf_counter() - start
    d = _final(result)
    # A stopped run still reports its throughput and memory (budgeted runs mostly end so).
    assert result[1]["images_s"] > 0 and result[1]["step_ms"] > 0, result[1]
    assert result[1]["peak_rss_mb"] > 0, result[1]
    state = json.loads((d / STATE).read_text())
    assert 1 <= state["step"] < 100000 and state["stopped"] == "time_limit"
    # Past the limit by at most a step, a checkpoint and the teardown.
    assert limit <= wall < limit + 40, wall


def test_warm_start_reaches_every_worker(local_ray, tiny_cfg, tmp_path):
    """model.init_from: the driver reads the source once and hands its weights to the workers
    (through Ray's object store); the run starts from them, not from its seed's init."""
    cfg = tiny_cfg("run.max_steps=1", "optim.lr=1e-12", "optim.weight_decay=0", "run.name=warm")
    torch.manual_seed(123)  # another seed: weights unlike the run's own init
    source = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size).state_dict()
    source = {k: v.float() for k, v in source.items()}
    write_artifact(tmp_path / "source", source, cfg)
    cfg.model.init_from = str(tmp_path / "source")
    weights = read_weights(_final(pretrain(cfg)) / ENCODER)
    fresh = cfg.model_copy(deep=True)
    fresh.model.init_from = None
    init = build_model(fresh).encoder.state_dict()
    convs = [k for k in source if "conv" in k and k.endswith("weight")]
    assert convs
    for k in convs:  # one step at a vanishing learning rate: still the source's weights
        torch.testing.assert_close(weights[k], source[k], rtol=0, atol=1e-6, msg=k)
        assert not torch.equal(weights[k], init[k].float())
