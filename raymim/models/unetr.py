"""UNETR-style segmentation networks on raymim's token encoders (plain PyTorch + MONAI blocks).

- :class:`ViTUNETR`: MONAI ``UNETR`` with the encoder depth taken from the config, the three
  skip connections taken at 1/4, 1/2 and 3/4 of the depth, and patch 8 supported (one
  upsampling fewer per skip path) (3, 6, 9 for 12 layers: identical to MONAI's UNETR, so a
  12-layer network's state dict loads into ``monai.networks.nets.UNETR`` unchanged).
- :class:`ConvViTUNETR`: the same decoder on the hybrid ConvViT encoder (``.vit`` is a
  :class:`~raymim.models.convvit.ConvViTEncoder`, whose ``forward`` returns ``(tokens, hidden)``
  like MONAI's ViT). It is what ``raymim finetune`` builds for ``model.backbone=convvit`` and the
  ``network_def`` of a ConvViT MONAI bundle (``_target_: raymim.models.unetr.ConvViTUNETR``;
  MONAI has no class for this encoder), so its constructor takes plain values only.

  Deviation from the MiM reference's downstream ``ConvViT3dUNETR`` (a Swin-UNETR-style decoder
  whose skips are the conv stage outputs): the skips come from the transformer's hidden states
  as in UNETR, so one decoder serves the ViT and the ConvViT encoders and fine-tuning compares
  like with like; the conv stages still shape every token through the fused stage tokens.

Both live in ``raymim.models`` (not ``raymim.downstream``) because the MONAI bundle export names
``ConvViTUNETR`` as its network, and ``raymim.export`` never imports ``raymim.downstream``.

Example::

    >>> net = ConvViTUNETR(1, 3, (32, 32, 32), num_layers=2, hidden_size=48, mlp_dim=96, num_heads=4,
    ...                    patch_size=8, conv_channels=(8, 16))
    >>> net(torch.rand(1, 1, 32, 32, 32)).shape
    torch.Size([1, 3, 32, 32, 32])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import UNETR, ViT

from raymim.models.convvit import ConvViTEncoder


class ViTUNETR(UNETR):
    """MONAI ``UNETR`` with a configurable encoder depth (skips at depth/4, depth/2, 3 depth/4)."""

    def __init__(self, in_channels: int, out_channels: int, img_size: Sequence[int], *, num_layers: int = 12,
                 feature_size: int = 16, hidden_size: int = 768, mlp_dim: int = 3072, num_heads: int = 12,
                 norm_name: str = "instance", dropout_rate: float = 0.0, qkv_bias: bool = False,
                 patch_size: int = 16) -> None:
        super().__init__(in_channels, out_channels, img_size, feature_size=feature_size, hidden_size=hidden_size,
                         mlp_dim=mlp_dim, num_heads=num_heads, norm_name=norm_name, dropout_rate=dropout_rate,
                         qkv_bias=qkv_bias)
        if patch_size not in (8, 16):
            raise ValueError(f"ViTUNETR supports patch sizes 8 and 16, got patch_size={patch_size}.")
        if num_layers != self.num_layers or patch_size != 16:
            self.num_layers = num_layers
            self.patch_size = (patch_size,) * 3
            self.feat_size = tuple(int(i) // patch_size for i in img_size)
            self.proj_view_shape = list(self.feat_size) + [hidden_size]
            self.vit = ViT(in_channels=in_channels, img_size=img_size, patch_size=self.patch_size,
                           hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads,
                           proj_type="conv", classification=False, dropout_rate=dropout_rate, qkv_bias=qkv_bias)
        if patch_size == 8:
            # Tokens at 1/8: one upsampling fewer on every skip path, none for the deepest one.
            kw = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=True)
            self.encoder2 = UnetrPrUpBlock(in_channels=hidden_size, out_channels=feature_size * 2, num_layer=1,
                                           stride=1, upsample_kernel_size=2, conv_block=True, **kw)
            self.encoder3 = UnetrPrUpBlock(in_channels=hidden_size, out_channels=feature_size * 4, num_layer=0,
                                           stride=1, upsample_kernel_size=2, conv_block=True, **kw)
            self.encoder4 = UnetrBasicBlock(in_channels=hidden_size, out_channels=feature_size * 8, stride=1, **kw)
            self.decoder5 = UnetrUpBlock(in_channels=hidden_size, out_channels=feature_size * 8,
                                         upsample_kernel_size=1, **kw)
        self.skips = (num_layers // 4, num_layers // 2, (3 * num_layers) // 4)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden = self.vit(x_in)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(hidden[self.skips[0]]))
        enc3 = self.encoder3(self.proj_feat(hidden[self.skips[1]]))
        enc4 = self.encoder4(self.proj_feat(hidden[self.skips[2]]))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))


class ConvViTUNETR(ViTUNETR):
    """:class:`ViTUNETR`'s decoder on a :class:`~raymim.models.convvit.ConvViTEncoder` (``.vit``)."""

    def __init__(self, in_channels: int, out_channels: int, img_size: Sequence[int] | int, *, num_layers: int = 12,
                 feature_size: int = 16, hidden_size: int = 768, mlp_dim: int = 3072, num_heads: int = 12,
                 norm_name: str = "instance", dropout_rate: float = 0.0, patch_size: int = 16,
                 conv_channels: Sequence[int] = (32, 64), conv_depth: int = 2) -> None:
        roi = (int(img_size),) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(set(roi)) != 1:
            raise ValueError(f"the convvit encoder takes cubic inputs, got img_size={roi}.")
        super().__init__(in_channels, out_channels, roi, num_layers=1, feature_size=feature_size,
                         hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads, norm_name=norm_name,
                         dropout_rate=dropout_rate, patch_size=patch_size)
        self.vit = ConvViTEncoder(in_channels, roi[0], patch_size, hidden_size, mlp_dim, num_layers, num_heads,
                                  tuple(conv_channels), dropout_rate, conv_depth)
        self.num_layers, self.skips = num_layers, (num_layers // 4, num_layers // 2, (3 * num_layers) // 4)


__all__ = ["ConvViTUNETR", "ViTUNETR"]
