"""Views cut from the full-resolution image: crop geometry, aspect-kept evaluation view, the
reduced-size JPEG decode, and the stream's per-sample crops (seeded by seed, epoch and key)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_dist.config import DataConfig, ViewsConfig
from ssl_dist.data.crops import (
    RESAMPLE,
    centre_box,
    decode_boxes,
    decode_crops,
    decode_views,
    open_image,
    random_resized_box,
    sample_rng,
)
from ssl_dist.data.reader import decode_image
from ssl_dist.data.shards import write_shards
from ssl_dist.data.sources import Source, Split
from ssl_dist.data.stream import stream
from ssl_dist.data.views import TwoViewInputs, TwoViews

pytestmark = pytest.mark.unit

W, H, S = 96, 48, 16
SCALE = (0.08, 1.0)


def _halves() -> np.ndarray:
    """96 x 48 RGB: red rises 2.5 per column, green 5 per row; blue 0 on the left half, 255 on
    the right."""
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    blue = np.where(x >= W // 2, 255, 0)
    return np.stack([x * 2.5, y * 5.0, blue], axis=-1).round().astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _check_lands(view: torch.Tensor, box) -> None:
    """The view's red / green ramps and blue share are those of `box` in the full image."""
    left, top, right, bottom = box
    v = view.double()
    centres_x = left + (np.arange(S) + 0.5) * (right - left) / S  # output column centres
    centres_y = top + (np.arange(S) + 0.5) * (bottom - top) / S
    inner = slice(2, S - 2)  # away from the resampling edges
    red = v[0].mean(0).numpy()[inner]
    green = v[1].mean(1).numpy()[inner]
    assert np.allclose(red, 2.5 * (centres_x[inner] - 0.5), atol=2.5), (box, red)
    assert np.allclose(green, 5.0 * (centres_y[inner] - 0.5), atol=5.0), (box, green)
    right_share = np.clip((right - max(left, W / 2)) / (right - left), 0, 1)
    assert abs(v[2].mean().item() / 255 - right_share) < 0.08, (box, v[2].mean().item())


def test_evaluation_view_keeps_the_aspect_ratio():
    view = decode_image(_png(_halves()), S, 3)
    assert view.shape == (3, S, S)
    # Short side to 16 px, centre crop: columns 24..72 of the 96, half on each blue half.
    _check_lands(view, (24.0, 0.0, 72.0, 48.0))


def test_crops_land_where_the_sampled_boxes_say():
    payload = _png(_halves())
    for key in ("a", "b", "c", "d", "e", "f"):
        rng = sample_rng(3, 1, key)
        boxes = [random_resized_box(rng, W, H, SCALE) for _ in range(2)]
        views = decode_crops(payload, S, 3, sample_rng(3, 1, key), SCALE)
        assert views.shape == (2, 3, S, S)
        _check_lands(decode_views(payload, S, 3), centre_box(W, H))
        for view, (left, top, right, bottom) in zip(views, boxes, strict=True):
            assert 0 <= left < right <= W and 0 <= top < bottom <= H
            area = (right - left) * (bottom - top) / (W * H)
            assert SCALE[0] - 1e-9 <= area <= SCALE[1] + 1e-9
            assert 3 / 4 - 1e-9 <= (right - left) / (bottom - top) <= 4 / 3 + 1e-9
            _check_lands(view, (left, top, right, bottom))


def test_box_sampling_covers_scale_and_position():
    rng = np.random.default_rng(0)
    boxes = np.array([random_resized_box(rng, 640, 480, (0.2, 1.0)) for _ in range(2000)])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (640 * 480)
    assert areas.min() < 0.22 and areas.max() > 0.95
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert (centres < 240).mean() > 0.1 and (centres > 400).mean() > 0.1, "crops not spread"
    # A very wide image: the fallback keeps the ratio range, centred.
    left, top, right, bottom = random_resized_box(rng, 1000, 10, (0.9, 1.0))
    assert (right - left) / (bottom - top) == pytest.approx(4 / 3) and top == 0


def test_large_jpeg_is_decoded_at_reduced_size():
    x, y = np.meshgrid(np.linspace(0, 255, 1200), np.linspace(0, 255, 800))
    image = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    big_box = [(100.0, 0.0, 900.0, 800.0)]
    with open_image(buf.getvalue()) as raw:
        (reduced,), factor = decode_boxes(raw, big_box, 64, 3)
    assert factor == 8
    with Image.open(io.BytesIO(buf.getvalue())) as raw:
        full = raw.convert("RGB").resize((64, 64), RESAMPLE, box=big_box[0])
    full_t = torch.from_numpy(np.asarray(full).copy()).permute(2, 0, 1)
    assert (reduced.float() - full_t.float()).abs().mean() < 2.0
    with open_image(buf.getvalue()) as raw:
        _, factor = decode_boxes(raw, [(0.0, 0.0, 100.0, 100.0)], 64, 3)
    assert factor == 1, "a crop smaller than twice the output must be decoded at full size"


def test_views_from_loader_crops_skip_the_second_crop():
    cfg = ViewsConfig(flip_p=0, jitter_p=0, grayscale_p=0, normalize=False)
    views = TwoViews(cfg, S, 3)
    crops = torch.randint(0, 256, (4, 2, 3, S, S), dtype=torch.uint8)
    x1, x2 = views.from_crops(crops, seed=1)
    assert torch.equal(x1, crops[:, 0].float() / 255) and torch.equal(x2, crops[:, 1] / 255)
    default = TwoViews(ViewsConfig(), S, 3, [0.5] * 3, [0.2] * 3)
    a, b = default.from_crops(crops, seed=5), default.from_crops(crops, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], default.from_crops(crops, seed=6)[0])
    # One view of the first crops is the first of the two views (single-view methods, DINO).
    assert torch.equal(default.single_from_crops(crops[:, 0], seed=5), a[0])
    with pytest.raises(ValueError, match="crops are"):
        views.from_crops(torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8))


def _shards(tmp_path, n=24, shape=(H, W, 3)):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    split = Split([f"k{i:03d}" for i in range(n)], list(range(n)), lambda i: images[i])
    out = tmp_path / "shards"
    write_shards(Source("wide", [str(i) for i in range(n)], 3, {"train": split}), out, 8)
    return out, images


def _by_label(cfg, epoch, **kw):
    got = {}
    for batch in stream(cfg, 0, 1, epoch, seed=7, crop_scale=SCALE, **kw):
        assert batch.crops is not None and batch.crops.shape[1:] == (2, 3, S, S)
        for label, crops in zip(batch.labels.tolist(), batch.crops, strict=True):
            got[label] = crops
    return got


def test_stream_crops_follow_seed_epoch_and_key(tmp_path):
    out, images = _shards(tmp_path)
    cfg = DataConfig(manifest=str(out / "manifest.json"), batch_size=4, image_size=S)
    first = _by_label(cfg, epoch=2)
    assert len(first) == 24
    for label in (0, 13):
        shard = f"train-{label // 8:06d}.tar"
        rng = sample_rng(7, 2, f"{shard}/k{label:03d}")
        want = decode_crops(_png(images[label]), S, 3, rng, SCALE)
        assert torch.equal(first[label], want), "not the key's seeded crops"
    # Another read order (no shuffle) cuts the same crops; another epoch other ones.
    again = _by_label(cfg.model_copy(update={"shuffle_buffer": 0}), epoch=2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = _by_label(cfg, epoch=3)
    assert sum(torch.equal(first[k], other[k]) for k in first) == 0
    # The inputs name the crop the training stream should cut, and take the loader's crops.
    inputs = TwoViewInputs(TwoViews(ViewsConfig(crop_scale=SCALE), S, 3, [0.5] * 3, [0.2] * 3))
    assert inputs.crop_scale == SCALE
    batch = next(iter(stream(cfg, 0, 1, 2, seed=7, crop_scale=inputs.crop_scale)))
    x1, x2 = inputs(batch, 1)
    assert x1.shape == x2.shape == (4, 3, S, S)
    assert torch.equal(x1, inputs.views.from_crops(batch.crops, seed=1)[0])


def test_tiny_images_give_sensible_crops(tmp_path):
    out, images = _shards(tmp_path, 16, (8, 8, 3))
    cfg = DataConfig(manifest=str(out / "manifest.json"), batch_size=4, image_size=8)
    batch = next(iter(stream(cfg, 0, 1, 0, seed=1, crop_scale=(0.2, 1.0))))
    assert batch.crops is not None and batch.crops.shape == (4, 2, 3, 8, 8)
    assert not torch.equal(batch.crops[:, 0], batch.crops[:, 1]), "the two views are one crop"
    # A training stream decodes only the crops; the evaluation stream gives the images as stored.
    assert batch.images is None
    with pytest.raises(ValueError, match="training crops only"):
        batch.eval_images()
    plain = next(iter(stream(cfg, 0, 1, 0, seed=1)))
    assert plain.crops is None
    assert torch.equal(
        plain.eval_images(), torch.from_numpy(images[plain.labels]).permute(0, 3, 1, 2)
    )


@pytest.mark.slow
def test_stream_crops_do_not_depend_on_loader_workers(tmp_path):
    out, _ = _shards(tmp_path)
    cfg = DataConfig(manifest=str(out / "manifest.json"), batch_size=4, image_size=S)
    alone = _by_label(cfg, epoch=1)
    workers = _by_label(cfg.model_copy(update={"loader_workers": 2}), epoch=1)
    assert alone.keys() == workers.keys()
    assert all(torch.equal(alone[k], workers[k]) for k in alone)
