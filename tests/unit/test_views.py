"""Batched two-view augmentation."""

from __future__ import annotations

import pytest
import torch

from ssl_dist.config import ViewsConfig
from ssl_dist.data.views import TwoViews, blur_kernel_size, per_sample_torchvision_views

pytestmark = pytest.mark.unit

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _batch(b: int = 8, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), generator=g, dtype=torch.uint8)


def _plain(**kw: object) -> ViewsConfig:
    """Only the crop, no normalisation: isolates one augmentation at a time."""
    base: dict[str, object] = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, normalize=False)
    base.update(kw)
    return ViewsConfig(**base)  # type: ignore[arg-type]


def _tv(v: torch.Tensor) -> torch.Tensor:
    """Total variation per image: smaller after a blur."""
    return (v.diff(dim=-1).abs().mean((1, 2, 3))) + (v.diff(dim=-2).abs().mean((1, 2, 3)))


@pytest.mark.parametrize(("channels", "size", "in_size"), [(3, 32, 32), (1, 28, 32), (3, 28, 28)])
def test_shapes_dtype_and_range(channels: int, size: int, in_size: int) -> None:
    views = TwoViews(ViewsConfig(normalize=False), size, channels)
    x1, x2 = views(_batch(6, 3, in_size), seed=0)
    for x in (x1, x2):
        assert x.shape == (6, channels, size, size) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_normalisation_is_applied_per_channel() -> None:
    cfg = ViewsConfig(blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
    raw = TwoViews(cfg.model_copy(update={"normalize": False}), 32, 3)
    norm = TwoViews(cfg, 32, 3, MEAN, STD)
    batch = _batch()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for r, n in zip(raw(batch, seed=3), norm(batch, seed=3), strict=True):
        torch.testing.assert_close(n, (r - mean) / std)


def test_seeded_views_are_deterministic_and_leave_global_rng_alone() -> None:
    views = TwoViews(ViewsConfig(blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)), 32, 3, MEAN, STD)
    batch = _batch()
    state = torch.random.get_rng_state()
    a1, a2 = views(batch, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b1, b2 = views(batch, seed=7)
    c1, _ = views(batch, seed=8)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1)


def test_two_views_differ() -> None:
    x1, x2 = TwoViews(ViewsConfig(), 32, 3, MEAN, STD)(_batch(), seed=0)
    assert not torch.allclose(x1, x2)


def test_per_sample_parameters_differ_across_batch() -> None:
    same = _batch(1).expand(8, -1, -1, -1).contiguous()  # 8 copies of one image
    x1, _ = TwoViews(_plain(), 32, 3)(same, seed=0)
    # Every pair of outputs differs: each sample got its own crop.
    diffs = (x1[:, None] - x1[None]).abs().flatten(2).amax(-1)
    assert bool((diffs + torch.eye(8) > 1e-3).all())


@pytest.mark.parametrize("channels", [1, 3])
def test_grey_input(channels: int) -> None:
    views = TwoViews(ViewsConfig(blur_p=(1.0, 0.1), normalize=False), 28, channels)
    x1, x2 = views(_batch(4, 1, 28), seed=0)
    assert x1.shape == x2.shape == (4, channels, 28, 28)
    if channels == 3:  # a grey image repeated to RGB: all channels equal
        assert torch.equal(x1[:, 0], x1[:, 1]) and torch.equal(x1[:, 0], x1[:, 2])


def test_colour_input_to_one_channel() -> None:
    x1, _ = TwoViews(ViewsConfig(), 32, 1, (0.5,), (0.25,))(_batch(), seed=0)
    assert x1.shape == (8, 1, 32, 32)


def test_solarize_toggle() -> None:
    batch = _batch()
    off, _ = TwoViews(_plain(), 32, 3)(batch, seed=1)
    on, _ = TwoViews(_plain(solarize_p=(1.0, 0.0)), 32, 3)(batch, seed=1)
    # Same seed, same crop; solarization at 0.5 inverts the bright pixels only.
    torch.testing.assert_close(on, torch.where(off >= 0.5, 1.0 - off, off))
    assert not torch.allclose(on, off)


def test_blur_toggle() -> None:
    batch = _batch()
    off, _ = TwoViews(_plain(), 32, 3)(batch, seed=1)
    on, _ = TwoViews(_plain(blur_p=(1.0, 0.0)), 32, 3)(batch, seed=1)
    # A blur never adds variation; sigma near 0.1 leaves an image almost unchanged, so only the
    # batch mean has to drop clearly.
    assert bool((_tv(on) <= _tv(off) + 1e-6).all())
    assert float(_tv(on).mean()) < 0.9 * float(_tv(off).mean())
    assert blur_kernel_size(32) == 3 and blur_kernel_size(224) == 23


def test_bad_input_is_rejected() -> None:
    views = TwoViews(_plain(), 32, 3)
    with pytest.raises(ValueError, match="uint8"):
        views(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="mean"):
        TwoViews(ViewsConfig(), 32, 3)


def test_torchvision_reference_shapes() -> None:
    cfg = ViewsConfig(blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
    x1, x2 = per_sample_torchvision_views(_batch(4, 1, 28), cfg, 28, 3, MEAN, STD)
    assert x1.shape == x2.shape == (4, 3, 28, 28) and x1.dtype == torch.float32
