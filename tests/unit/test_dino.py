"""DINO in one process: the loss against a direct formula, the centre and its update, the
teacher temperature schedule, the multi-crop inputs and the loader's local crops."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from ssl_dist.config import Config, DataConfig, DinoConfig, MethodConfig, ViewsConfig
from ssl_dist.data.crops import (
    CropPlan,
    decode_crops,
    decode_multi_crops,
    random_resized_box,
    sample_rng,
)
from ssl_dist.data.multicrop import MultiCropInputs
from ssl_dist.data.shards import read_manifest, write_shards
from ssl_dist.data.sources import Source, Split
from ssl_dist.data.stream import Batch, stream
from ssl_dist.methods import DINO, METHODS, build_method
from ssl_dist.methods.dino import dino_loss, teacher_temperature
from tests.unit.test_methods import BATCH, CHANS, MODEL, SIZE, _views

pytestmark = pytest.mark.unit

DINO_CFG = DinoConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8)
LOCAL = 8  # local crop side (global: SIZE = 16)


def _dino(**kw: object) -> DINO:
    torch.manual_seed(0)
    dino = DINO_CFG.model_copy(update=kw.pop("dino", {}))
    method = build_method(MethodConfig(name="dino", dino=dino, **kw), MODEL, CHANS, SIZE)  # type: ignore[arg-type]
    assert isinstance(method, DINO)
    return method


def _locals(m: int = 3, seed: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, m, CHANS, LOCAL, LOCAL, generator=gen)


# ---------------------------------------------------------------------------------- the loss


def _loss_by_loop(student: Tensor, teacher: Tensor, center: Tensor, ts: float, tt: float) -> float:
    """The reference's DINOLoss written per image, per pair, per class, in Python floats."""
    s_list, t_list, c_list = student.tolist(), teacher.tolist(), center.tolist()
    total, terms = 0.0, 0
    for i in range(2):
        for v in range(len(s_list)):
            if v == i:
                continue
            pair = 0.0
            for t_row, s_row in zip(t_list[i], s_list[v], strict=True):
                t = [(x - c) / tt for x, c in zip(t_row, c_list, strict=True)]
                s = [x / ts for x in s_row]
                t_max, s_max = max(t), max(s)
                q = [math.exp(x - t_max) for x in t]
                log_zs = s_max + math.log(sum(math.exp(x - s_max) for x in s))
                pair += -sum(qk / sum(q) * (sk - log_zs) for qk, sk in zip(q, s, strict=True))
            total += pair / len(s_list[v])
            terms += 1
    return total / terms


def test_loss_matches_the_reference_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)  # 2 global + 2 local
    teacher = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    center = 0.3 * torch.randn(5, generator=gen, dtype=torch.float64)
    got = dino_loss(student, teacher, center, 0.1, 0.04)
    want = _loss_by_loop(student, teacher, center, 0.1, 0.04)
    assert float(got) == pytest.approx(want, rel=1e-12)
    # Same-view pairs are skipped: making student view 0 equal teacher view 0's target would
    # change a loss that counted the (0, 0) pair; here it changes only through the (1, 0) pair.
    student2 = student.clone()
    student2[0] = 3 * teacher[0]
    assert float(dino_loss(student2, teacher, center, 0.1, 0.04)) == pytest.approx(
        _loss_by_loop(student2, teacher, center, 0.1, 0.04), rel=1e-12
    )


def test_loss_hand_computed_values() -> None:
    # A flat student gives log K whatever the teacher: every term is -sum q log(1 / K).
    teacher = torch.tensor([[[5.0, 0.0, 0.0]], [[0.0, 5.0, 1.0]]], dtype=torch.float64)
    flat = torch.zeros(3, 1, 3, dtype=torch.float64)
    got = dino_loss(flat, teacher, torch.zeros(3, dtype=torch.float64), 0.1, 0.04)
    assert float(got) == pytest.approx(math.log(3), rel=1e-12)
    # K = 2, one image, 2 views: the teacher's centred logits (1, 0) at T_t = 1 give
    # q = (e / (e + 1), 1 / (e + 1)) for view 0; view 1 the same; the student's view 1 is
    # (0, ln 3) at T_s = 1, p = (1/4, 3/4); view 0 likewise. Each pair: -q . log p.
    teacher = torch.tensor([[[1.5, 0.5]], [[1.5, 0.5]]], dtype=torch.float64)
    center = torch.tensor([0.5, 0.5], dtype=torch.float64)
    student = torch.tensor([[[0.0, math.log(3)]], [[0.0, math.log(3)]]], dtype=torch.float64)
    q0 = math.e / (math.e + 1)
    want = -(q0 * math.log(0.25) + (1 - q0) * math.log(0.75))
    assert float(dino_loss(student, teacher, center, 1.0, 1.0)) == pytest.approx(want, rel=1e-12)


def test_loss_stops_the_gradient_at_the_teacher_and_checks_shapes() -> None:
    student = torch.randn(3, 2, 4, requires_grad=True)
    teacher = torch.randn(2, 2, 4, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(4), 0.1, 0.04).backward()
    assert student.grad is not None and torch.count_nonzero(student.grad) > 0
    assert teacher.grad is None
    with pytest.raises(ValueError, match="teacher"):
        dino_loss(torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), torch.zeros(4), 0.1, 0.04)


def test_forward_is_the_loss_of_student_and_teacher_outputs() -> None:
    method = _dino()
    # BN on running statistics, so that the views can be written out one batch at a time.
    method.eval()
    x1, x2 = _views()
    local = _locals()
    with torch.no_grad():
        method.center.normal_()  # a centre that matters
    loss, metrics = method(x1, x2, local)
    assert set(metrics) == {
        "pos_sim",
        "alignment",
        "uniformity",
        "teacher_temp",
        "teacher_entropy",
    }
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    # Written out: student on every view, the teacher on the global ones.
    views = [x1, x2, *local.unbind(1)]
    student = torch.stack([method.head(method.encoder(v)) for v in views])
    with torch.no_grad():
        teacher = torch.stack([method.momentum_head(method.momentum_encoder(v)) for v in (x1, x2)])
    assert student.shape == (5, BATCH, DINO_CFG.out_dim)
    want = _loss_by_loop(student.detach().double(), teacher.double(), method.center, 0.1, 0.04)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert 0 <= float(metrics["teacher_entropy"]) <= math.log(DINO_CFG.out_dim)
    # Gradient reaches the student only.
    loss.backward()
    assert all(p.grad is not None for p in method.trainable_parameters())
    teacher_params = [p for t, _ in method.momentum_pairs() for p in t.parameters()]
    assert teacher_params and all(p.grad is None and not p.requires_grad for p in teacher_params)
    # Two global views only: 2 pairs, (0, 1) and (1, 0).
    loss2, _ = method(x1, x2)
    want2 = _loss_by_loop(student[:2].detach().double(), teacher.double(), method.center, 0.1, 0.04)
    assert float(loss2.detach()) == pytest.approx(want2, rel=1e-5)


def test_head_last_layer_is_weight_normalised() -> None:
    method = _dino()
    w = method.head.last_layer.weight_v
    assert w.shape == (DINO_CFG.out_dim, DINO_CFG.bottleneck_dim)
    assert method.head.last_layer.weight_g is None  # norm_last_layer: every row has norm 1
    x = torch.nn.functional.normalize(torch.randn(3, DINO_CFG.bottleneck_dim), dim=1)
    with torch.no_grad():
        w.mul_(torch.rand(w.shape[0], 1) * 5 + 0.1)  # the rows' norms do not matter
    want = x @ torch.nn.functional.normalize(w, dim=1).T
    torch.testing.assert_close(method.head.last_layer(x), want)
    learned = _dino(dino={"norm_last_layer": False}).head.last_layer
    assert learned.weight_g is not None and learned.weight_g.requires_grad
    assert torch.equal(learned.weight_g, torch.ones(DINO_CFG.out_dim, 1))


# ---------------------------------------------------------------------------------- centre


def test_center_moves_once_per_step_with_the_mean_teacher_output() -> None:
    method = _dino(dino={"center_momentum": 0.9})
    x1, x2 = _views()
    before = method.center.clone()
    method(x1, x2)
    assert torch.equal(method.center, before), "the centre moved inside forward"
    with torch.no_grad():
        t1 = method.momentum_head(method.momentum_encoder(torch.cat([x1, x2])))
    method.momentum_update(1, 10)
    torch.testing.assert_close(method.center, 0.9 * before + 0.1 * t1.mean(0))
    # Gradient accumulation: two micro-batches, one update with the mean of both.
    y1, y2 = _views(seed=5)
    c1 = method.center.clone()
    with torch.no_grad():
        t1 = method.momentum_head(method.momentum_encoder(torch.cat([x1, x2])))
        t2 = method.momentum_head(method.momentum_encoder(torch.cat([y1, y2])))
    method(x1, x2)
    method(y1, y2)
    method.momentum_update(2, 10)
    torch.testing.assert_close(method.center, 0.9 * c1 + 0.1 * torch.cat([t1, t2]).mean(0))
    # No forward since: the centre stays.
    c2 = method.center.clone()
    method.momentum_update(3, 10)
    assert torch.equal(method.center, c2)


def test_state_dict_holds_center_and_step_not_the_pending_sums() -> None:
    method = _dino()
    keys = set(method.state_dict())
    assert {"center", "steps_done"} <= keys
    assert not {"pending_sum", "pending_count"} & keys
    assert {"momentum_encoder.conv1.weight", "momentum_head.last_layer.weight_v"} <= keys


# ---------------------------------------------------------------------------------- schedules


def test_teacher_temperature_is_the_reference_linspace_then_constant() -> None:
    want = np.linspace(0.04, 0.07, 5)
    got = [teacher_temperature(s, 5, 0.04, 0.07) for s in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert teacher_temperature(5, 5, 0.04, 0.07) == 0.07
    assert teacher_temperature(0, 0, 0.04, 0.07) == 0.07  # no warm-up
    assert teacher_temperature(0, 1, 0.04, 0.07) == 0.04


@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_method_temperature_is_the_schedule_of_its_step_buffer(warmup: int) -> None:
    method = _dino(
        dino={
            "warmup_teacher_temp": 0.04,
            "teacher_temp": 0.07,
            "teacher_temp_warmup_steps": warmup,
        }
    )
    for step in range(7):
        method.steps_done.fill_(step)
        want = teacher_temperature(step, warmup, 0.04, 0.07)
        assert float(method.teacher_temp()) == pytest.approx(want, rel=1e-12)


def test_method_follows_the_schedule_by_optimizer_steps() -> None:
    method = _dino(
        momentum=0.9,
        momentum_final=1.0,
        dino={"warmup_teacher_temp": 0.02, "teacher_temp": 0.06, "teacher_temp_warmup_steps": 3},
    )
    x1, x2 = _views()
    temps, moms = [], []
    for step in range(4):
        _, metrics = method(x1, x2)
        temps.append(float(metrics["teacher_temp"]))
        moms.append(method.momentum_update(step + 1, 4))
    assert temps == pytest.approx([0.02, 0.04, 0.06, 0.06])
    assert moms == pytest.approx(
        [1 - 0.1 * (math.cos(math.pi * s / 4) + 1) / 2 for s in (1, 2, 3, 4)]
    )
    # A resumed method continues the schedule from its loaded state.
    fresh = _dino(dino=method.cfg.dino.model_dump())
    fresh.load_state_dict(method.state_dict())
    assert int(fresh.steps_done) == 4 and torch.equal(fresh.center, method.center)


def test_registry_and_config() -> None:
    assert METHODS["dino"] is DINO
    assert MethodConfig(name="dino").dino.out_dim == 65536
    with pytest.raises(ValueError):
        DinoConfig(local_scale=(0.5, 0.1))


# ---------------------------------------------------------------------------------- inputs

W, H = 64, 48


def _ramps() -> np.ndarray:
    """64 x 48 RGB: red = 4 x column, green = 5 x row, blue 0."""
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    return np.stack([x * 4.0, y * 5.0, 0 * x], axis=-1).round().astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_local_crops_land_inside_the_image_at_the_local_size() -> None:
    plan = CropPlan((0.4, 1.0), local_count=4, local_size=LOCAL, local_scale=(0.05, 0.4))
    payload = _png(_ramps())
    globals_, local = decode_multi_crops(payload, SIZE, 3, np.random.default_rng(3), plan)
    assert globals_.shape == (2, 3, SIZE, SIZE) and globals_.dtype == torch.uint8
    assert local.shape == (4, 3, LOCAL, LOCAL) and local.dtype == torch.uint8
    # The global crops are those of the two-crop decode with the same generator.
    assert torch.equal(
        globals_, decode_crops(payload, SIZE, 3, np.random.default_rng(3), plan.scale)
    )
    # The local boxes are the generator's next draws: inside the image, of the local scale, and
    # the pixels come from them (the ramps' means are those at the box centres).
    rng = np.random.default_rng(3)
    for _ in range(2):
        random_resized_box(rng, W, H, plan.scale)
    for crop in local:
        left, top, right, bottom = random_resized_box(rng, W, H, plan.local_scale)
        assert 0 <= left < right <= W and 0 <= top < bottom <= H
        assert 0.05 - 1e-9 <= (right - left) * (bottom - top) / (W * H) <= 0.4 + 1e-9
        red, green = crop[0].double().mean().item(), crop[1].double().mean().item()
        assert red == pytest.approx(4.0 * ((left + right) / 2 - 0.5), abs=3.0)
        assert green == pytest.approx(5.0 * ((top + bottom) / 2 - 0.5), abs=4.0)


def _shards(tmp_path, n: int = 12):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    split = Split([f"k{i:03d}" for i in range(n)], list(range(n)), lambda i: images[i])
    out = tmp_path / "shards"
    write_shards(Source("ramps", [str(i) for i in range(n)], 3, {"train": split}), out, 4)
    return out, images


def test_stream_cuts_local_crops_from_the_same_decode(tmp_path) -> None:
    out, images = _shards(tmp_path)
    cfg = DataConfig(manifest=str(out / "manifest.json"), batch_size=4, image_size=SIZE)
    plan = CropPlan((0.4, 1.0), local_count=3, local_size=LOCAL)
    multi = list(stream(cfg, 0, 1, 1, seed=7, crop_scale=plan))
    plain = list(stream(cfg, 0, 1, 1, seed=7, crop_scale=plan.scale))
    assert len(multi) == len(plain) == 3
    for a, b in zip(multi, plain, strict=True):
        assert a.images is None and a.local_crops is not None and b.local_crops is None
        assert a.local_crops.shape == (4, 3, 3, LOCAL, LOCAL)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.crops, b.crops)
    label = int(multi[0].labels[0])
    rng = sample_rng(7, 1, f"train-{label // 4:06d}.tar/k{label:03d}")
    _, want = decode_multi_crops(_png(images[label]), SIZE, 3, rng, plan)
    assert torch.equal(multi[0].local_crops[0], want)


def _inputs(tmp_path, m: int) -> MultiCropInputs:
    out, _ = _shards(tmp_path)
    cfg = Config(
        data=DataConfig(manifest=str(out / "manifest.json"), batch_size=4, image_size=SIZE),
        views=ViewsConfig(crop_scale=(0.4, 1.0)),
        method=MethodConfig(
            name="dino", dino=DINO_CFG.model_copy(update={"local_crops": m, "local_size": LOCAL})
        ),
    )
    method = build_method(cfg.method, MODEL, CHANS, SIZE)
    inputs = method.make_inputs(cfg, read_manifest(out), "cpu")
    assert isinstance(inputs, MultiCropInputs)
    return inputs


def test_inputs_shapes_from_loader_crops_and_from_images(tmp_path) -> None:
    inputs = _inputs(tmp_path, m=3)
    assert inputs.crop_scale == CropPlan((0.4, 1.0), 3, LOCAL, (0.05, 0.4))
    # Local recipe (DINO's local_transfo): the local side and scale, blur 0.5, no solarization.
    steps = {type(s).__name__: s for s in inputs.local.colour[0]}
    assert inputs.local.image_size == LOCAL and inputs.local.crop_scale == (0.05, 0.4)
    assert steps["RandomGaussianBlur"].p == 0.5 and "RandomSolarize" not in steps
    cfg = DataConfig(
        manifest=str(tmp_path / "shards" / "manifest.json"), batch_size=4, image_size=SIZE
    )
    batch = next(iter(stream(cfg, 0, 1, 0, seed=1, crop_scale=inputs.crop_scale)))
    x1, x2, local = inputs(batch, seed=3)
    assert x1.shape == x2.shape == (4, 3, SIZE, SIZE)
    assert local.shape == (4, 3, 3, LOCAL, LOCAL) and local.dtype == torch.float32
    again = inputs(batch, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((x1, x2, local), again, strict=True))
    # The global views are the two-view recipe's on the same crops; locals get their own draws.
    assert torch.equal(x1, inputs.views.from_crops(batch.crops, seed=3)[0])
    assert not torch.equal(local[:, 0], local[:, 1])
    # Evaluation views only (no loader crops): the crops are cut on the device.
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    y1, y2, ylocal = inputs(Batch(images, torch.zeros(4, dtype=torch.long)), seed=3)
    assert y1.shape == (4, 3, SIZE, SIZE) and ylocal.shape == (4, 3, 3, LOCAL, LOCAL)
    # The method takes them.
    method = _dino()
    loss, _ = method(x1, x2, local)
    assert torch.isfinite(loss)
    # A batch without the local crops the method wants is refused.
    with pytest.raises(ValueError, match="local crops"):
        inputs(Batch(None, batch.labels, batch.crops), seed=3)


def test_inputs_without_local_crops_are_two_views(tmp_path) -> None:
    inputs = _inputs(tmp_path, m=0)
    assert inputs.crop_scale == (0.4, 1.0)  # a plain two-crop stream
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    out = inputs(Batch(images, torch.zeros(4, dtype=torch.long)), seed=0)
    assert len(out) == 2 and out[0].shape == (4, 3, SIZE, SIZE)
