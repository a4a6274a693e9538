"""MAE and SimMIM on the task seam: the mask, what the encoder sees, what the loss counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_dist.config import Config, MethodConfig, ModelConfig, load_config
from ssl_dist.data.stream import Batch
from ssl_dist.methods import MAE, SimMIM, build_method
from ssl_dist.methods.mae import sincos_pos_embed
from ssl_dist.methods.masking import (
    MaskedInputs,
    keep_count,
    masked_pixel_loss,
    mim_views,
    patchify,
    random_masking,
)
from ssl_dist.methods.simmim import feature_map
from tests.unit.test_methods import MODEL
from tests.unit.test_rotation import _manifest

pytestmark = pytest.mark.unit

VIT = ModelConfig(encoder="vit_tiny", vit_heads=3)
SIZE = 16  # vit_tiny with the small stem: 4 px patches, a 4x4 grid


def _mae(**masked: object) -> MAE:
    torch.manual_seed(0)
    method = build_method(MethodConfig(name="mae", masked=masked), VIT, 3, SIZE)  # type: ignore[arg-type]
    assert isinstance(method, MAE)
    return method


def test_mask_has_the_ratio_per_image_and_follows_the_seed() -> None:
    cfg = Config.model_validate({"data": {"image_size": 8, "channels": 1}})
    inputs = MaskedInputs(mim_views(cfg, _manifest()), 64, "cpu")
    noise = inputs.noise(5, seed=11)
    assert torch.equal(noise, inputs.noise(5, seed=11))
    assert not torch.equal(noise, inputs.noise(5, seed=12))
    keep = keep_count(64, 0.75)
    assert keep == 16 and cfg.method.masked.mask_ratio == 0.75
    ids_keep, ids_restore, mask = random_masking(noise, keep)
    assert mask.sum(dim=1).tolist() == [48.0] * 5  # every image masks 75%
    assert len({tuple(row.tolist()) for row in mask}) == 5  # a mask of its own per image
    # The kept patches are those of lowest noise, and the mask says so.
    lowest = noise.argsort(dim=1)[:, :keep]
    assert torch.equal(ids_keep, lowest)
    assert torch.all(mask.gather(1, ids_keep) == 0)
    assert torch.equal(torch.argsort(ids_restore, dim=1)[:, :keep], ids_keep)


def test_inputs_are_one_plain_view_and_the_seeded_noise() -> None:
    cfg = Config.model_validate({"data": {"image_size": 8, "channels": 1}})
    method = build_method(
        MethodConfig(name="simmim", masked={"mask_patch": 2}),  # type: ignore[arg-type]
        MODEL.model_copy(update={"encoder": "thin_resnet"}),
        1,
        8,
    )
    inputs = method.make_inputs(cfg, _manifest(), "cpu")
    assert isinstance(inputs, MaskedInputs) and inputs.crop_scale == cfg.views.crop_scale
    crops = torch.randint(0, 256, (3, 2, 1, 8, 8), dtype=torch.uint8)
    x, noise = inputs(Batch(None, torch.zeros(3, dtype=torch.long), crops), seed=5)
    assert x.shape == (3, 1, 8, 8) and noise.shape == (3, 16)
    again = inputs(Batch(None, torch.zeros(3, dtype=torch.long), crops), seed=5)
    assert torch.equal(again[0], x) and torch.equal(again[1], noise)
    # The first crop, flipped or not, normalised with the manifest's mean 0.5 and std 0.25:
    # no colour step changes a pixel value.
    first = (crops[:, 0].float() / 255 - 0.5) / 0.25
    for i in range(3):
        assert torch.allclose(x[i], first[i]) or torch.allclose(x[i], first[i].flip(-1))
    # Evaluation batches (no loader crops) are cropped here.
    images = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8)
    x2, noise2 = inputs(Batch(images, torch.zeros(3, dtype=torch.long)), seed=5)
    assert x2.shape == (3, 1, 8, 8) and torch.equal(noise2, noise)


def test_encoder_sees_only_the_visible_patches() -> None:
    method = _mae().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    noise = torch.rand(2, method.num_patches, generator=gen)
    tokens, mask, _ = method.encode_visible(x, noise)
    assert tokens.shape == (2, 1 + method.keep, 192) and method.keep == 4
    pixel_mask = mask.reshape(2, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    changed = x + 10 * pixel_mask * torch.randn(x.shape, generator=gen)  # masked pixels only
    assert not torch.equal(changed, x)
    torch.testing.assert_close(method.encode_visible(changed, noise)[0], tokens)
    visible_changed = x + 10 * (1 - pixel_mask) * torch.randn(x.shape, generator=gen)
    assert (method.encode_visible(visible_changed, noise)[0] - tokens).abs().max() > 1e-3


def test_loss_counts_only_the_masked_patches_and_matches_a_hand_value() -> None:
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])  # N=1, L=3, P=2
    target = torch.tensor([[[0.0, 0.0], [1.0, 3.0], [4.0, 6.0]]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    # Raw pixels: patch 1: (1 + 9) / 2 = 5; patch 2: (1 + 1) / 2 = 1; mean 3.
    assert masked_pixel_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(3.0)
    # Normalised pixels: patch 1 -> (-0.707, 0.707) (mean 2, unbiased var 2), same for patch 2.
    t = 0.5**0.5 / (1 + 0.5e-6) ** 0.5
    want = (((0 + t) ** 2 + (0 - t) ** 2) / 2 + ((5 + t) ** 2 + (5 - t) ** 2) / 2) / 2
    got = masked_pixel_loss(pred, target, mask, norm_pix=True).item()
    assert got == pytest.approx(want, rel=1e-6)
    other = pred.clone()
    other[0, 0] = 100.0  # the visible patch's prediction is not in the loss
    assert masked_pixel_loss(other, target, mask, norm_pix=True).item() == pytest.approx(got)


def test_forward_loss_is_the_masked_patch_mse_of_the_decoder() -> None:
    method = _mae(norm_pix_loss=False)
    x = torch.randn(2, 3, SIZE, SIZE)
    noise = torch.rand(2, method.num_patches)
    loss, metrics = method(x, noise)
    tokens, mask, ids_restore = method.encode_visible(x, noise)
    pred = method.decode(tokens, ids_restore)
    per_patch = (pred - patchify(x, 4)).pow(2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())
    assert metrics["mask_ratio"].item() == 0.75
    loss.backward()
    # The encoder trains; its class token gets a gradient through the decoder's attention.
    assert method.encoder.cls_token.grad is not None
    assert method.encoder.cls_token.grad.abs().sum() > 0
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0


def test_encoder_position_embedding_is_fixed_sincos() -> None:
    method = _mae()
    pos = method.encoder.pos_embed
    grid = SIZE // method.patch
    torch.testing.assert_close(pos.detach(), sincos_pos_embed(pos.shape[-1], grid)[None])
    assert not pos.requires_grad
    assert all(p is not pos for p in method.trainable_parameters())
    learned = _mae(fixed_pos_embed=False).encoder.pos_embed
    assert learned.requires_grad and not torch.allclose(learned.detach(), pos.detach())


def test_kept_encoder_still_pools_full_images() -> None:
    method = _mae()
    x = torch.randn(3, 3, SIZE, SIZE)
    loss, _ = method(x, torch.rand(3, method.num_patches))
    loss.backward()
    features = method.encoder(x)
    assert features.shape == (3, 192)
    assert method.trainable_parameters() and method.momentum_pairs() == []


def test_decoder_position_embedding_is_the_reference_sincos() -> None:
    dim, grid = 8, 3

    def ref_1d(d: int, pos: np.ndarray) -> np.ndarray:  # mae/util/pos_embed.py
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    ref = np.concatenate([ref_1d(dim // 2, g[0]), ref_1d(dim // 2, g[1])], axis=1)
    ref = np.concatenate([np.zeros([1, dim]), ref], axis=0)
    torch.testing.assert_close(sincos_pos_embed(dim, grid), torch.tensor(ref, dtype=torch.float32))


def test_simmim_zeroes_masked_squares_and_predicts_full_resolution() -> None:
    torch.manual_seed(0)
    method = build_method(MethodConfig(name="simmim"), MODEL, 3, SIZE)
    assert isinstance(method, SimMIM) and method.num_patches == 16 and method.keep == 4
    x = torch.randn(2, 3, SIZE, SIZE)
    noise = torch.rand(2, 16)
    loss, metrics = method(x, noise)
    _, _, mask = random_masking(noise, method.keep)
    pm = method.pixel_mask(mask, SIZE)
    assert pm.shape == (2, 1, SIZE, SIZE) and pm.mean().item() == 0.75
    # The encoder sees the image with the masked squares at zero (the dataset mean); the head
    # maps its stride-8 feature map back to 16 px; the loss is on the masked squares.
    fmap = feature_map(method.encoder, x * (1 - pm))
    assert fmap.shape == (2, 8, 2, 2) and method.decoder(fmap).shape == x.shape
    pred = patchify(method.decoder(fmap), 4)
    torch.testing.assert_close(loss, masked_pixel_loss(pred, patchify(x, 4), mask, True))
    unmasked = patchify(method.decoder(feature_map(method.encoder, x)), 4)
    assert (masked_pixel_loss(unmasked, patchify(x, 4), mask, True) - loss).abs() > 1e-6
    assert metrics["mask_ratio"].item() == 0.75 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.parameters())


def test_encoder_families_are_checked_and_the_config_reads_overrides() -> None:
    with pytest.raises(ValueError, match="simmim"):
        build_method(MethodConfig(name="mae"), MODEL, 3, SIZE)
    with pytest.raises(ValueError, match="mae"):
        build_method(MethodConfig(name="simmim"), VIT, 3, SIZE)
    cfg = load_config(None, ["method.name=mae", "method.masked.mask_ratio=0.6"])
    assert cfg.method.masked.mask_ratio == 0.6
    with pytest.raises(ValueError, match="decoder_heads"):
        _mae(decoder_dim=30, decoder_heads=4)
