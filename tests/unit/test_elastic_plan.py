"""Elastic-run bookkeeping of the training loop, without Ray: the step plan and batch policy at a
new world size, the stream position and the MoCo v2 queue pointer after a resize, and the
driver's checks of an elastic range."""

from __future__ import annotations

import warnings

import pytest

from ssl_dist.config import Config, ConfigError
from ssl_dist.data.stream import ShardSet
from ssl_dist.methods import build_method
from ssl_dist.train import checkpoint as ckpt
from ssl_dist.train.driver import _scaling, check_elastic
from ssl_dist.train.elastic import elastic_plan, resize
from ssl_dist.train.parts import plan_steps
from tests.unit.test_methods import MODEL

pytestmark = pytest.mark.unit

SHARDS = ShardSet(manifest=None, urls=[], counts=[100] * 12)  # type: ignore[arg-type]


def _simclr():
    """A stateless method: a resize moves only the stream position."""
    return build_method(_cfg().method, MODEL, in_chans=1, image_size=8)


def _cfg(**sections) -> Config:
    base = {
        "data": {"batch_size": 10},
        "optim": {"lr": 0.1, "base_batch": 10},
        "run": {"epochs": 3},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Config.model_validate(base)


def test_same_size_is_the_plain_plan() -> None:
    cfg = _cfg()
    plan, accum = elastic_plan(cfg, SHARDS, 2, first_size=2)
    assert plan == plan_steps(cfg, SHARDS, 2) and accum == 1


@pytest.mark.parametrize("size", [1, 3, 4])
def test_keep_per_worker_batch_rescales_lr_and_keeps_the_step_count(size: int) -> None:
    cfg = _cfg(run={"epochs": 3, "max_steps": 50})
    first = plan_steps(cfg, SHARDS, 2)
    plan, accum = elastic_plan(cfg, SHARDS, size, first_size=2)
    assert accum == 1 and plan.global_batch == 10 * size
    assert plan.peak_lr == pytest.approx(0.1 * size)  # linear scaling, base_batch 10
    assert plan.total_steps == first.total_steps == 50


def test_epoch_plan_keeps_the_first_sizes_step_count() -> None:
    cfg = _cfg()  # 3 epochs: 3 x (600 / 10) steps at 2 workers
    plan, _ = elastic_plan(cfg, SHARDS, 4, first_size=2)
    assert plan.total_steps == 3 * 60
    assert plan.batches_per_epoch == 30  # the new split: 3 shards of 100 per rank


@pytest.mark.parametrize(("size", "accum"), [(1, 4), (2, 2), (4, 1)])
def test_keep_global_batch_accumulates(size: int, accum: int) -> None:
    cfg = _cfg(scaling={"elastic_policy": "keep_global_batch"}, optim={"grad_accum": 2})
    plan, got = elastic_plan(cfg, SHARDS, size, first_size=2)
    assert got == accum and plan.global_batch == 40
    assert plan.peak_lr == pytest.approx(plan_steps(cfg, SHARDS, 2).peak_lr)


def test_keep_global_batch_refuses_what_does_not_divide() -> None:
    cfg = _cfg(scaling={"elastic_policy": "keep_global_batch"})
    with pytest.raises(ValueError, match="not a multiple of 30"):
        elastic_plan(cfg, SHARDS, 3, first_size=2)


@pytest.mark.parametrize(
    ("old", "new", "before", "after", "epoch"),
    [(2, 3, 30, 20, 0), (3, 2, 21, 31, 0), (2, 1, 25, 50, 0), (1, 4, 99, 24, 0), (2, 5, 59, 0, 1)],
)
def test_resize_maps_the_stream_position(old, new, before, after, epoch) -> None:
    cfg = _cfg()
    plan, micro = elastic_plan(cfg, SHARDS, new, first_size=old)
    state = ckpt.TrainState(step=7, batch_in_epoch=before, world_size=old)
    resize(state, new, plan, micro, _simclr(), cfg, rank=1)
    assert (state.epoch, state.batch_in_epoch) == (epoch, after)


def test_resize_rounds_the_position_down_to_whole_steps() -> None:
    cfg = _cfg(optim={"grad_accum": 2})
    plan, micro = elastic_plan(cfg, SHARDS, 3, first_size=2)
    state = ckpt.TrainState(batch_in_epoch=8, world_size=2)  # 4 steps x 2 micro-batches
    resize(state, 3, plan, micro, _simclr(), cfg, rank=1)
    assert micro == 2 and state.batch_in_epoch == 4  # 16 // 3 = 5 micro-batches: 2 steps


@pytest.mark.parametrize(
    ("ptr", "new", "moved"),
    [(32, 3, 48), (64, 3, 72), (56, 2, 64), (90, 3, 0), (0, 3, 0), (40, 1, 40)],
)
def test_resize_aligns_the_moco_queue_pointer(ptr: int, new: int, moved: int) -> None:
    cfg = _cfg(data={"batch_size": 8}, method={"name": "moco_v2", "queue_size": 96})
    plan, micro = elastic_plan(cfg, SHARDS, new, first_size=2)
    method = build_method(cfg.method, MODEL, in_chans=1, image_size=8)
    method.queue_ptr.fill_(ptr)
    resize(ckpt.TrainState(world_size=2), new, plan, micro, method, cfg, rank=1)
    assert int(method.queue_ptr) == moved
    assert moved % (8 * new) == 0


def test_driver_scaling_and_checks(monkeypatch) -> None:
    assert _scaling(_cfg()) == {"num_workers": 2}
    monkeypatch.setenv("SSL_DIST_ELASTIC_RESIZE_INTERVAL_S", "5")
    elastic = _cfg(scaling={"num_workers": [1, 3]}, run={"max_failures": 2})
    assert _scaling(elastic) == {"num_workers": (1, 3), "elastic_resize_monitor_interval_s": 5.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_elastic(elastic)
    with pytest.warns(UserWarning, match="max_failures=0"):
        check_elastic(_cfg(scaling={"num_workers": [1, 3]}))
    moco = {"name": "moco_v2", "queue_size": 40}
    with pytest.raises(ConfigError, match=r"not at \[3\]"):
        check_elastic(_cfg(scaling={"num_workers": [1, 4]}, method=moco, run={"max_failures": 1}))


def test_train_state_reads_checkpoints_without_history(tmp_path) -> None:
    (tmp_path / ckpt.STATE).write_text('{"step": 3, "world_size": 2}')
    assert ckpt.TrainState.read(tmp_path).world_sizes == []
    state = ckpt.TrainState(world_sizes=[[0, 2], [10, 3]])
    (tmp_path / ckpt.STATE).write_text(state.to_json())
    assert ckpt.TrainState.read(tmp_path).world_sizes == [[0, 2], [10, 3]]
