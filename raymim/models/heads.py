"""Lightweight decoders and heads: MAE transformer decoder, SimMIM linear / pixel-shuffle heads,
projection heads for contrastive and alignment losses.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (a narrow transformer
decoder over [visible latents + mask tokens] with fixed sin-cos positions; paper default 8
blocks of width 512, 3D ports use ~4 x 384); Xie et al., "SimMIM", CVPR 2022 (a one-layer
linear prediction head is enough); Chen et al., "SimCLR", ICML 2020 (MLP projection head).

Example::

    >>> dec = MAEDecoder(grid=(4, 4, 4), in_dim=48, hidden_size=48, num_layers=1, num_heads=4, out_dim=512)
    >>> m = random_masking(2, 64, 0.75)
    >>> pred, feats = dec(torch.rand(2, 16, 48), m.ids_restore)  # [2, 64, 512], [2, 64, 48]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from einops import rearrange
from monai.networks.blocks import TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers import trunc_normal_
from torch import nn


class MAEDecoder(nn.Module):
    """MAE decoder: embed visible latents, insert mask tokens, unshuffle, transformer, predict.

    forward(latent [N, K, in_dim], ids_restore [N, L]) -> (pred [N, L, out_dim], feats [N, L, hidden]).
    ``feats`` (the normalised decoder states) give features for masked positions, which MiM's
    cross-level alignment needs. ``fused_attention``: the blocks' attention through torch's
    ``scaled_dot_product_attention`` (MONAI's ``use_flash_attention``; ``model.fused_attention``).
    """

    def __init__(
        self,
        grid: Sequence[int],
        in_dim: int,
        hidden_size: int = 384,
        num_layers: int = 4,
        num_heads: int = 12,
        out_dim: int = 16**3,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        if hidden_size % 6:
            raise ValueError(f"hidden_size should be divisible by 6 (3D sin-cos positions), got {hidden_size}.")
        self.embed = nn.Linear(in_dim, hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        with warnings.catch_warnings():  # MONAI 1.6 calls torch.meshgrid without `indexing` (torch warns)
            warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release", category=UserWarning)
            self.pos_embed = build_sincos_position_embedding(list(grid), hidden_size, 3)  # fixed, [1, L, hidden]
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, 4 * hidden_size, num_heads, 0.0, qkv_bias=True,
                             use_flash_attention=fused_attention)  # torch SDPA; same keys either way
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.pred = nn.Linear(hidden_size, out_dim)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(latent)  # [N, K, H]
        n, length = ids_restore.shape
        masks = self.mask_token.expand(n, length - x.shape[1], -1)
        x = torch.cat([x, masks], dim=1)  # [N, L, H] in shuffled order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        feats = self.norm(x)
        return self.pred(feats), feats


class LinearHead(nn.Module):
    """SimMIM head for token backbones: [N, L, D] -> [N, L, p^3 * C] (a linear map per token)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PixelShuffleHead(nn.Module):
    """SimMIM head for hierarchical backbones: 1x1x1 conv to ``C * s^3`` then 3D pixel shuffle.

    [N, in, d, h, w] -> [N, C, d*s, h*s, w*s].
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.out_channels = out_channels
        self.conv = nn.Conv3d(in_channels, out_channels * scale**3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        return rearrange(self.conv(x), "n (c p q r) d h w -> n c (d p) (h q) (w r)", p=s, q=s, r=s)


class ProjectionHead(nn.Module):
    """Two-layer MLP projection (SimCLR-style): [..., in_dim] -> [..., out_dim]."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or max(in_dim, out_dim)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
