"""Hybrid ConvViT-3D: masked convolution stages, then a ViT on visible tokens (MiM's backbone).

Gao et al., "MCMAE: Masked Convolution Meets Masked Autoencoders", NeurIPS 2022 (ConvMAE), in
the 3D form of Zhuang et al., "MiM: Mask in Mask", TMI 2025 (reference code
``Pretrain/models_convmae3d_v4.py`` and ``vision_transformer.py`` of github.com/JiaxinZhuang/MiM).

* ``len(conv_channels)`` convolution stages at strides 2, 4, ...: each is a stride-2 patch
  embedding (``Conv3d`` kernel 2, a LayerNorm over channels, GELU: the reference's
  ``PatchEmbed3d``) and ``conv_depth`` masked convolution blocks (the reference's ``CBlock3d``:
  channel LayerNorm, 1x1 conv, the keep-mask, 5^3 depthwise conv, 1x1 conv, residual; channel
  LayerNorm, 1x1-conv MLP, residual). LayerNorm normalises each voxel over its channels, so no
  statistic mixes voxels and none depends on the mask (InstanceNorm's statistics, taken over
  the visible and zeroed voxels of a volume, shifted with the mask).
* No leak: the token mask, upsampled to each stage, zeroes masked regions of the input and of
  every stage output, and multiplies the features right before each depthwise convolution (the
  only operator that mixes neighbouring voxels; every other one is per-voxel or, like the
  kernel-2 stride-2 embeddings, token-aligned), so no masked voxel reaches a visible feature.
* A MONAI ``PatchEmbeddingBlock`` (patch ``patch_size / 2**stages``) turns the last stage into
  tokens at the total stride ``patch_size``; MONAI ``TransformerBlock``\\ s encode only the
  visible tokens (MAE) or all tokens with mask tokens (SimMIM).
* Multi-scale fusion as ConvMAE / the reference (``stage{s}_output_decode``): each stage output
  goes through a ``Conv3d`` with kernel = stride = its remaining stride to the token grid, and
  these stage tokens (the visible ones, for MAE) are *added to the transformer's output* before
  the final LayerNorm.

Deliberate deviations from the reference: learnable position embeddings (MONAI's
``PatchEmbeddingBlock``, the key layout MONAI's ViT and the checkpoint converters share) instead
of fixed sin-cos ones; the last stage is embedded by MONAI's conv projection (no LayerNorm / GELU /
extra ``Linear`` as ``patch_embed4`` + ``patch_embed5``), which keeps that layout too; masked
regions are also zeroed between stages (the reference only masks inside the depthwise branch,
which suffices for MAE, whose stage tokens are gathered at visible positions, but would let
SimMIM's masked positions carry their content into the fused tokens); the stage count and widths
are configurable (``model.conv_channels``, ``model.conv_depth``; the reference's base model has
three stages of 48 / 96 / 192 channels, two blocks each, before an 11-block ViT of width 384).

Key layout::

    conv_stages.{s}.embed.proj.{weight,bias}         Conv3d(c_{s-1}, c_s, 2, stride 2)
    conv_stages.{s}.embed.norm.{weight,bias}         channel LayerNorm
    conv_stages.{s}.blocks.{j}.norm1/norm2.{weight,bias}
    conv_stages.{s}.blocks.{j}.conv1/dwconv/conv2.{weight,bias}
    conv_stages.{s}.blocks.{j}.mlp.{0,2}.{weight,bias}
    stage_fuse.{s}.{weight,bias}                     Conv3d(c_s, hidden, patch / 2**(s+1), same stride)
    patch_embedding.position_embeddings              [1, L, hidden]
    patch_embedding.patch_embeddings.{weight,bias}
    blocks.{i}.*                                     same as MONAI ViT blocks
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
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from torch import nn

from raymim.masking.tokens import gather_tokens
from raymim.models.vit import TokenEncoderMixin


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each voxel: [N, C, D, H, W] -> same shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class StageEmbed(nn.Module):
    """Stride-2 patch embedding of a conv stage: Conv3d(kernel 2, stride 2), channel LayerNorm, GELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, out_channels, 2, stride=2)
        self.norm = ChannelLayerNorm(out_channels, eps=1e-6)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class MaskedConvBlock(nn.Module):
    """ConvMAE's convolution block in 3D; ``keep`` [N, 1, D, H, W] (1 = visible) zeroes masked
    voxels right before the 5^3 depthwise convolution, so they cannot reach visible ones."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = ChannelLayerNorm(dim, eps=1e-6)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.dwconv = nn.Conv3d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.norm2 = ChannelLayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Conv3d(dim, hidden, 1), nn.GELU(), nn.Conv3d(hidden, dim, 1))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv1(self.norm1(x))
        if keep is not None:
            y = y * keep
        x = x + self.conv2(self.dwconv(y))
        return x + self.mlp(self.norm2(x))


class ConvStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int) -> None:
        super().__init__()
        self.embed = StageEmbed(in_channels, out_channels)
        self.blocks = nn.ModuleList(MaskedConvBlock(out_channels) for _ in range(depth))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x, keep)
        return x if keep is None else x * keep


class ConvViTEncoder(TokenEncoderMixin, nn.Module):
    """Masked conv stages + ViT + fused stage tokens. ``forward(x)`` returns ``(tokens,
    hidden_states)`` like MONAI ViT (tokens after fusion and the final norm)."""

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
        conv_depth: int = 2,
    ) -> None:
        super().__init__()
        down = 2 ** len(conv_channels)
        if patch_size % down:
            raise ValueError(f"patch_size should be divisible by 2**len(conv_channels)={down}, got {patch_size}.")
        if conv_depth < 0:
            raise ValueError(f"conv_depth should be >= 0, got {conv_depth}.")
        chans = [in_channels, *conv_channels]
        self.conv_stages = nn.ModuleList(
            ConvStage(chans[i], chans[i + 1], conv_depth) for i in range(len(conv_channels))
        )
        self.stage_fuse = nn.ModuleList(
            nn.Conv3d(c, hidden_size, patch_size // 2 ** (s + 1), stride=patch_size // 2 ** (s + 1))
            for s, c in enumerate(conv_channels)
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

    def _keep_at(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Token mask [N, L] (1 = removed) -> keep mask [N, 1, *x.spatial] (nearest upsampling)."""
        vol = mask.to(x.dtype).view(-1, 1, *self.grid)
        return 1.0 - F.interpolate(vol, size=tuple(x.shape[2:]), mode="nearest")

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Conv stage outputs (strides 2, 4, ...), masked regions zeroed. mask: [N, L] or None."""
        if mask is not None:
            x = x * self._keep_at(mask, x)
        feats = []
        for stage in self.conv_stages:
            keep = None if mask is None else self._keep_at(mask, x[:, :, ::2, ::2, ::2])
            x = stage(x, keep)
            feats.append(x)
        return feats

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [N, L, D] without position, fused stage tokens [N, L, D])``."""
        feats = self.forward_features(x, mask)
        tokens = self.patch_embedding.patch_embeddings(feats[-1]).flatten(2).transpose(1, 2)
        fused = sum(fuse(f).flatten(2).transpose(1, 2) for fuse, f in zip(self.stage_fuse, feats, strict=True))
        return tokens, fused  # type: ignore[return-value]

    def embed_patches(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C, D, H, W] -> [N, L, D] tokens (no position), conv stages masked by ``mask``."""
        return self._embed(x, mask)[0]

    def _encode(self, tokens: torch.Tensor, fused: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks over ``tokens`` (position added), then the stage tokens added, then the norm."""
        x = self.patch_embedding.dropout(tokens)
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        return self.norm(x + fused), hidden

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """MAE encoding of the kept tokens only. x: [N, C, D, H, W], ids_keep: [N, K] -> [N, K, D]."""
        mask = torch.ones(x.shape[0], self.num_tokens, device=x.device).scatter(1, ids_keep, 0.0)
        tokens, fused = self._embed(x, mask)
        tokens = gather_tokens(tokens + self.patch_embedding.position_embeddings, ids_keep)
        return self._encode(tokens, gather_tokens(fused, ids_keep))[0]

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """SimMIM encoding of all tokens, masked ones replaced by ``mask_token`` [1, 1, D]
        (their stage tokens come from zeroed features). x: [N, C, D, H, W], mask: [N, L] -> [N, L, D]."""
        tokens, fused = self._embed(x, mask)
        w = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1.0 - w) + mask_token.to(tokens.dtype) * w
        return self._encode(tokens + self.patch_embedding.position_embeddings, fused)[0]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens, no mask: [N, C, D, H, W] -> [N, L, D]."""
        return self.forward(x)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens, fused = self._embed(x, None)
        return self._encode(tokens + self.patch_embedding.position_embeddings, fused)
