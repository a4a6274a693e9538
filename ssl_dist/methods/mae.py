"""MAE: He, Chen, Xie, Li, Dollar, Girshick, "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022 (arXiv 2111.06377; reference code facebookresearch/mae ``models_mae.py``).

A ViT encoder sees only the visible patches of an image (75% are masked, at random per image);
a light transformer decoder gets the encoded visible tokens plus a shared learned mask token at
every masked position, and predicts every patch's pixels; the loss is the mean squared error on
the masked patches only, against pixels normalised per patch (``norm_pix_loss``).

The encoder is the run's timm ``VisionTransformer`` itself (``self.encoder``, kept after
pretraining): the masked path below calls its ``patch_embed``, ``pos_embed``, ``cls_token``,
``blocks`` and ``norm`` on the visible tokens, and leaves its ``forward`` (full image, pooled
class token ``[B, F]``) untouched for the kNN monitor and the linear probe. As in the
reference, the encoder's position embedding is set to the fixed 2-D sin-cos one and frozen
(``method.masked.fixed_pos_embed``; False keeps timm's learned one, random at init), and the
decoder's is fixed 2-D sin-cos too (a buffer). Difference from the reference: the decoder is
narrower and shallower by default (``method.masked``).

ZeRO-3: ``pos_embed`` and ``cls_token`` are read here outside the encoder's own ``forward``, so
DeepSpeed does not gather them for this path; they stay whole on every rank because they are
under DeepSpeed's ``stage3_param_persistence_threshold`` (1e5 elements by default; ViT-S/16 at
224 px has 197 x 384 = 75,648). Setting that threshold to 0 would partition them.

ResNets have no tokens to drop: they train with :mod:`~ssl_dist.methods.simmim` (a method
name of its own, so that the recorded ``method.name`` says which algorithm ran).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ssl_dist.config import Config, MethodConfig, ModelConfig
from ssl_dist.data.shards import Manifest
from ssl_dist.methods.base import SSLMethod
from ssl_dist.methods.masking import (
    MaskedInputs,
    keep_count,
    masked_pixel_loss,
    mim_views,
    patchify,
    random_masking,
)


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[1 + grid * grid, dim]`` with a zero row for the
    class token (facebookresearch/mae ``util/pos_embed.py``, ``get_2d_sincos_pos_embed``): the
    first half of the channels encodes the column, the second half the row."""
    if dim % 4:
        raise ValueError(f"the sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # [L, dim/4]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)  # [L, dim]
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


class MAE(SSLMethod):
    """ViT encoder on visible patches + transformer decoder, MSE on masked patches.

    Args:
        method: Method config (``masked``: ``mask_ratio``, ``norm_pix_loss``, ``decoder_dim``,
            ``decoder_depth``, ``decoder_heads``).
        model: Model config; the encoder must be ``vit_tiny`` or ``vit_small``.
        in_chans: Input channels.
        image_size: Input side (a multiple of the patch size).

    Raises:
        ValueError: for a ResNet encoder (use ``simmim``) or a decoder width the heads or the
            sin-cos embedding cannot split.
    """

    name: ClassVar[str] = "mae"
    encoder: VisionTransformer
    decoder_pos_embed: Tensor

    def __init__(
        self, method: MethodConfig, model: ModelConfig, in_chans: int, image_size: int
    ) -> None:
        if not model.encoder.startswith("vit"):
            raise ValueError(
                f"method mae needs a ViT encoder (vit_tiny, vit_small), got {model.encoder}; "
                "ResNets train masked image modelling with method.name=simmim"
            )
        super().__init__(method, model, in_chans, image_size)
        enc = self.encoder
        plain = enc.pos_embed is not None and enc.cls_token is not None and enc.reg_token is None
        if not plain or enc.no_embed_class or enc.num_prefix_tokens != 1:
            raise ValueError(
                "mae expects timm's ViT: a class token, position embedding, no registers"
            )
        masked = method.masked
        dim, heads = masked.decoder_dim, masked.decoder_heads
        if dim % heads:
            raise ValueError(f"method.masked.decoder_heads {heads} must divide decoder_dim {dim}")
        self.patch = int(enc.patch_embed.patch_size[0])
        grid = image_size // self.patch
        self.num_patches = grid * grid
        self.keep = keep_count(self.num_patches, masked.mask_ratio)
        if self.keep >= self.num_patches:
            raise ValueError(
                f"method.masked.mask_ratio {masked.mask_ratio} masks no patch of {grid}x{grid}"
            )
        if masked.fixed_pos_embed:
            # As the reference: 2-D sin-cos, frozen, so the encoder knows where each visible
            # patch sits from the first step (a learned one starts as noise).
            assert enc.pos_embed is not None  # checked above
            with torch.no_grad():
                enc.pos_embed.copy_(sincos_pos_embed(enc.embed_dim, grid)[None])
            enc.pos_embed.requires_grad_(False)
        self.decoder_embed = nn.Linear(enc.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dim, grid)[None], False)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(masked.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch * self.patch * in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        # As models_mae.initialize_weights: xavier-uniform linears, normal(0.02) mask token.
        nn.init.normal_(self.mask_token, std=0.02)
        decoder = [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        for part in decoder:
            for m in part.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def make_inputs(
        self, cfg: Config, manifest: Manifest, device: torch.device | str
    ) -> MaskedInputs:
        return MaskedInputs(mim_views(cfg, manifest), self.num_patches, device)

    def encode_visible(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The encoder on the visible patches (``models_mae.forward_encoder``).

        Args: x: images ``[N, C, H, W]``; noise: masking noise ``[N, L]``.

        Returns: tokens ``[N, 1 + keep, D]`` (class token first, after the final norm),
        ``mask`` ``[N, L]`` (1 masked) and ``ids_restore`` ``[N, L]``.
        """
        enc = self.encoder
        pos, cls_token = enc.pos_embed, enc.cls_token
        assert pos is not None and cls_token is not None  # checked in __init__
        tokens = enc.patch_embed(x) + pos[:, 1:]  # [N, L, D]
        ids_keep, ids_restore, mask = random_masking(noise, self.keep)
        index = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        visible = torch.gather(tokens, 1, index)  # [N, keep, D]
        cls = (cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        h = enc.norm_pre(enc.pos_drop(torch.cat([cls, visible], dim=1)))
        return enc.norm(enc.blocks(h)), mask, ids_restore

    def decode(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """Predicted pixels of every patch ``[N, L, patch * patch * C]``
        (``models_mae.forward_decoder``): mask tokens fill the masked positions, then the
        patches are put back in image order."""
        h = self.decoder_embed(tokens)  # [N, 1 + keep, d]
        n, length, d = h.shape[0], ids_restore.shape[1], h.shape[2]
        fill = self.mask_token.to(h.dtype).expand(n, length - (h.shape[1] - 1), -1)
        patches = torch.cat([h[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        h = torch.cat([h[:, :1], patches], dim=1) + self.decoder_pos_embed.to(h.dtype)
        for block in self.decoder_blocks:
            h = block(h)
        return self.decoder_pred(self.decoder_norm(h))[:, 1:]

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x: one view ``[N, C, H, W]``; noise: masking noise ``[N, L]``. Returns: the
        masked-patch MSE (a mean over local images, each masking the same number of patches)
        and ``mask_ratio`` (the share of patches masked)."""
        tokens, mask, ids_restore = self.encode_visible(x, noise)
        pred = self.decode(tokens, ids_restore)
        loss = masked_pixel_loss(pred, patchify(x, self.patch), mask, self.cfg.masked.norm_pix_loss)
        return loss, {"mask_ratio": mask.detach().float().mean()}
