"""Swin encoder: MONAI's ``SwinTransformer`` (``SwinUNETR(...).swinViT``) with SimMIM masking.

Liu et al., "Swin Transformer", ICCV 2021; Hatamizadeh et al., "Swin UNETR", BrainLes 2021;
Xie et al., "SimMIM", CVPR 2022 (a learnable mask token replaces masked patch embeddings; the
hierarchy then runs on all tokens). The class *is* a ``SwinTransformer`` built with SwinUNETR's
defaults (patch 2, merging downsample, qkv bias, no patch norm, v1), so its ``state_dict``
loads into ``SwinUNETR(feature_size=F, depths=..., num_heads=..., window_size=w).swinViT`` with
zero missing and unexpected keys. Key layout::

    patch_embed.proj.{weight,bias}                            Conv3d(in_channels, F, 2, stride 2)
    layers{s}.0.blocks.{j}.norm1.{weight,bias}                s = 1..4, stage width F * 2**(s-1)
    layers{s}.0.blocks.{j}.attn.relative_position_bias_table
    layers{s}.0.blocks.{j}.attn.relative_position_index        (buffer)
    layers{s}.0.blocks.{j}.attn.qkv.{weight,bias}
    layers{s}.0.blocks.{j}.attn.proj.{weight,bias}
    layers{s}.0.blocks.{j}.norm2.{weight,bias}
    layers{s}.0.blocks.{j}.mlp.linear1.{weight,bias}, ...mlp.linear2.{weight,bias}
    layers{s}.0.downsample.reduction.weight, layers{s}.0.downsample.norm.{weight,bias}

The mask token lives in the pretraining method (see :class:`raymim.methods.simmim.SimMIM`).

Example::

    >>> enc = SwinEncoder(in_channels=1, feature_size=12, window_size=4, depths=(1, 1, 1, 1),
    ...                   num_heads=(1, 1, 2, 2))
    >>> x = torch.rand(1, 1, 32, 32, 32); mask_vox = torch.zeros(1, 1, 16, 16, 16)
    >>> enc.forward_masked(x, mask_vox, torch.zeros(12))[-1].shape  # [1, 192, 1, 1, 1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn


class SwinEncoder(SwinTransformer):
    """SwinUNETR's ``swinViT`` with a SimMIM ``forward_masked``. Total stride 32."""

    stride = 32

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        window_size: int = 7,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(window_size,) * 3,
            patch_size=(2, 2, 2),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=dropout_rate,
            norm_layer=nn.LayerNorm,
            patch_norm=False,
            spatial_dims=3,
            downsample="merging",
            use_v2=False,
        )
        self.hidden_size = feature_size * 16  # width of the last output (after the 4th merging)

    def forward_masked(
        self, x: torch.Tensor, mask_vox: torch.Tensor, mask_token: torch.Tensor, normalize: bool = True
    ) -> list[torch.Tensor]:
        """SimMIM forward. x: [N, C, D, H, W]; mask_vox: [N, 1, D/2, H/2, W/2] at the patch-embedding
        grid (1 = removed); mask_token: [F]. Returns the five stage outputs like ``forward``
        (strides 2, 4, 8, 16, 32; the last is [N, 16F, D/32, H/32, W/32])."""
        x0 = self.patch_embed(x)  # [N, F, D/2, H/2, W/2]
        w = mask_vox.to(x0.dtype)
        x0 = x0 * (1.0 - w) + mask_token.view(1, -1, 1, 1, 1).to(x0.dtype) * w
        x0 = self.pos_drop(x0)
        outs = [self.proj_out(x0, normalize)]
        for stage in (self.layers1, self.layers2, self.layers3, self.layers4):
            x0 = stage[0](x0.contiguous())
            outs.append(self.proj_out(x0, normalize))
        return outs
