"""Hybrid ConvViT-3D: masked convolution stages, then a ViT on visible tokens (MiM's backbone).

Gao et al., "MCMAE: Masked Convolution Meets Masked Autoencoders", NeurIPS 2022 (ConvMAE), as
used by Zhuang et al., "MiM: Mask in Mask", TMI 2025. ``len(conv_channels)`` stride-2
convolution stages run at high resolution; the token mask, upsampled to each stage, zeroes the
masked regions before and after every stage, so no masked voxel leaks into visible features.
A MONAI ``PatchEmbeddingBlock`` with patch ``patch_size / 2**stages`` turns the last stage
into tokens at the total stride ``patch_size`` (same grid as the ViT), and MONAI
``TransformerBlock``\\ s encode only the visible tokens (MAE) or all tokens with mask tokens
(SimMIM). Key layout::

    conv_stages.{s}.conv.{weight,bias}            Conv3d(c_{s-1}, c_s, 3, stride 2)
    conv_stages.{s}.adn.N.{weight,bias}           instance-norm affine (MONAI Convolution ADN)
    patch_embedding.position_embeddings           [1, L, hidden]
    patch_embedding.patch_embeddings.{weight,bias}
    blocks.{i}.*                                  same as MONAI ViT blocks
    norm.{weight,bias}

Example::

    >>> enc = ConvViTEncoder(1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=1,
    ...                      num_heads=4, conv_channels=(8, 16))
    >>> enc.forward_visible(torch.rand(2, 1, 32, 32, 32), random_masking(2, 64, 0.75).ids_keep).shape
    torch.Size([2, 16, 48])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, PatchEmbeddingBlock, TransformerBlock
from torch import nn

from raymim.models.vit import TokenEncoderMixin


class ConvViTEncoder(TokenEncoderMixin, nn.Module):
    """Masked conv stages + ViT. ``forward(x)`` returns ``(tokens, hidden_states)`` like MONAI ViT."""

    needs_voxel_mask = True

    def __init__(
        self,
        in_channels: int,
        img_size: int,
        patch_size: int,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        conv_channels: Sequence[int] = (32, 64),
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        down = 2 ** len(conv_channels)
        if patch_size % down:
            raise ValueError(f"patch_size should be divisible by 2**len(conv_channels)={down}, got {patch_size}.")
        chans = [in_channels, *conv_channels]
        self.conv_stages = nn.ModuleList(
            Convolution(3, chans[i], chans[i + 1], strides=2, kernel_size=3, act="GELU", norm="instance")
            for i in range(len(conv_channels))
        )
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=chans[-1],
            img_size=img_size // down,
            patch_size=patch_size // down,
            hidden_size=hidden_size,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            dropout_rate=dropout_rate,
            spatial_dims=3,
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias=False) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.grid = (img_size // patch_size,) * 3

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Conv stage outputs (strides 2, 4, ...), masked regions zeroed. mask: [N, L] or None."""
        feats = []
        for stage in self.conv_stages:
            if mask is not None:
                x = x * (1.0 - self._mask_at(mask, x))
            x = stage(x)
            if mask is not None:
                x = x * (1.0 - self._mask_at(mask, x))
            feats.append(x)
        return feats

    def _mask_at(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Token mask [N, L] -> [N, 1, *x.spatial] by nearest interpolation."""
        vol = mask.to(x.dtype).view(-1, 1, *self.grid)
        return F.interpolate(vol, size=tuple(x.shape[2:]), mode="nearest")

    def embed_patches(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C, D, H, W] -> [N, L, D] tokens (no position), conv stages masked by ``mask``."""
        feat = self.forward_features(x, mask)[-1]
        return self.patch_embedding.patch_embeddings(feat).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens = self.patch_embedding.dropout(self.embed_patches(x) + self.patch_embedding.position_embeddings)
        hidden = []
        for blk in self.blocks:
            tokens = blk(tokens)
            hidden.append(tokens)
        return self.norm(tokens), hidden
