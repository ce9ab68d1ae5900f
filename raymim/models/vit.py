"""ViT-3D encoder on MONAI's ``ViT``, with MAE (visible-only) and SimMIM (mask-token) forwards.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; He et al., "Masked Autoencoders
Are Scalable Vision Learners", CVPR 2022 (visible-only encoding); Xie et al., "SimMIM", CVPR 2022
(mask tokens). The class *is* a ``monai.networks.nets.ViT`` (conv patch embedding, learnable
position embedding, no qkv bias, no class token: UNETR's settings), so its ``state_dict`` has
MONAI's key layout and loads into ``UNETR(...).vit`` with zero missing and unexpected keys
(UNETR needs patch 16 and 12 layers)::

    patch_embedding.position_embeddings                [1, L, hidden]
    patch_embedding.patch_embeddings.{weight,bias}     Conv3d(in_channels, hidden, p, stride p)
    blocks.{i}.mlp.linear1.{weight,bias}               [mlp_dim, hidden]
    blocks.{i}.mlp.linear2.{weight,bias}               [hidden, mlp_dim]
    blocks.{i}.norm1.{weight,bias}, blocks.{i}.norm2.{weight,bias}
    blocks.{i}.attn.qkv.weight                         [3 * hidden, hidden]
    blocks.{i}.attn.out_proj.{weight,bias}             [hidden, hidden]
    norm.{weight,bias}

Mask tokens are owned by the pretraining method, not the encoder, so that nothing in this
``state_dict`` is foreign to MONAI.

Fused attention (``fused_attention=True``, ``model.fused_attention``): every MONAI ``SABlock``
computes softmax(q k^T / sqrt(d)) v with ``torch.nn.functional.scaled_dot_product_attention``
(MONAI's own ``use_flash_attention`` path: one fused kernel on a GPU, flash / memory-efficient,
instead of einsum + softmax + einsum and a materialised [N, heads, L, L] map). It changes no
parameter and no key, so checkpoints of either setting load into the other. MONAI 1.6's ``ViT``
constructor does not take the flag (its ``TransformerBlock`` does), so :func:`use_fused_attention`
sets it on the built blocks. Deviation: a block with attention dropout > 0 keeps MONAI's einsum
path, because MONAI passes its dropout rate to the fused kernel in eval mode too.

Example::

    >>> enc = ViTEncoder(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96,
    ...                  num_layers=1, num_heads=4)
    >>> m = random_masking(2, enc.num_tokens, 0.75)
    >>> enc.forward_visible(torch.rand(2, 1, 32, 32, 32), m.ids_keep).shape  # [2, 16, 48]
"""

from __future__ import annotations

import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import ViT
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn

from raymim.masking.tokens import gather_tokens


def use_fused_attention(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch MONAI's attention blocks under ``module`` to (``enabled``) or from torch's fused
    ``scaled_dot_product_attention``; returns ``module``. Weights and ``state_dict`` keys are unchanged.

    * ``SABlock`` (ViT / ConvViT / MAE decoder blocks): fused unless the block keeps attention
      weights (``save_attn``), has a relative position embedding, or drops attention weights
      (``dropout_rate > 0``: MONAI's fused call applies that dropout in eval mode as well).
    * Swin's ``WindowAttention``: MONAI 1.6 uses its fused path only with autograd off (probe,
      inference, sliding-window evaluation); training steps stay on the einsum path there.
    """
    for sub in module.modules():
        if isinstance(sub, SABlock):
            sub.use_flash_attention = bool(enabled) and not sub.save_attn and sub.rel_positional_embedding is None \
                and sub.dropout_rate == 0.0
        elif isinstance(sub, WindowAttention):
            sub.use_flash_attention = bool(enabled)
    return module


class TokenEncoderMixin:
    """Shared MAE / SimMIM forwards over ``embed_patches`` + position embedding + blocks + norm.

    Subclasses provide ``embed_patches(x, mask) -> [N, L, D]`` (no position embedding),
    ``patch_embedding`` (a MONAI ``PatchEmbeddingBlock``), ``blocks`` and ``norm``.
    """

    grid: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding.dropout(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """MAE encoding of the kept tokens only. x: [N, C, D, H, W], ids_keep: [N, K] -> [N, K, D].

        The patch convolution is patch-local (kernel = stride), and the blocks only ever see
        the gathered tokens, so masked voxels cannot influence the output.
        """
        mask = None
        if getattr(self, "needs_voxel_mask", False):
            mask = torch.ones(x.shape[0], self.num_tokens, device=x.device).scatter(1, ids_keep, 0.0)
        tokens = self.embed_patches(x, mask) + self.patch_embedding.position_embeddings  # [N, L, D]
        return self._run_blocks(gather_tokens(tokens, ids_keep))

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """SimMIM encoding of all tokens, masked ones replaced by ``mask_token`` [1, 1, D].

        x: [N, C, D, H, W], mask: [N, L] (1 = removed) -> [N, L, D].
        """
        tokens = self.embed_patches(x, mask)  # [N, L, D]
        w = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1.0 - w) + mask_token.to(tokens.dtype) * w
        return self._run_blocks(tokens + self.patch_embedding.position_embeddings)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens, no mask: [N, C, D, H, W] -> [N, L, D] (features for probes and heads)."""
        return self._run_blocks(self.embed_patches(x, None) + self.patch_embedding.position_embeddings)


class ViTEncoder(TokenEncoderMixin, ViT):
    """MONAI ``ViT`` (UNETR's ``.vit``) with ``forward_visible`` / ``forward_masked``.

    ``forward(x)`` is MONAI's own and returns ``(tokens, hidden_states)`` like ``UNETR.vit``.
    """

    def __init__(
        self,
        in_channels: int,
        img_size: int,
        patch_size: int,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        dropout_rate: float = 0.0,
        fused_attention: bool = True,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            classification=False,
            dropout_rate=dropout_rate,
            spatial_dims=3,
            qkv_bias=False,
        )
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.grid = (img_size // patch_size,) * 3
        use_fused_attention(self.blocks, fused_attention)

    def embed_patches(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C, D, H, W] -> [N, L, D] patch embeddings in (d, h, w) order, no position."""
        return self.patch_embedding.patch_embeddings(x).flatten(2).transpose(1, 2)
