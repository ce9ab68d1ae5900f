"""Segmentation networks around a pretrained encoder (weights go in with :func:`raymim.weights.load_encoder`).

- ``vit``: MONAI ``UNETR``. MONAI hard-codes 12 transformer layers and patch 16;
  :class:`ViTUNETR` is the same class with the encoder depth taken from the config, the three
  skip connections taken at 1/4, 1/2 and 3/4 of the depth, and patch 8 supported (one
  upsampling fewer per skip path) (3, 6, 9 for 12 layers: identical to MONAI's UNETR, so a
  12-layer network's state dict loads into ``monai.networks.nets.UNETR`` unchanged).
- ``swin``: MONAI ``SwinUNETR``; its ``swinViT`` is the encoder.
- ``convvit``: a UNETR-style decoder on raymim's hybrid ConvViT encoder (needs
  ``raymim.models.build_encoder``).

Example::

    net, prefix = build_segmentation_network(cfg.model, num_classes=3, roi_size=(32, 32, 32))
    report = raymim.weights.load_encoder(net, encoder_state, cfg.model, roi_size=(32, 32, 32))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import UNETR, SwinUNETR, ViT
from torch import nn

from raymim.config import ModelConfig
from raymim.weights import ENCODER_PREFIX, adapt_vit_state, infer_swin_args, vit_num_layers


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


def build_segmentation_network(
    model_cfg: ModelConfig,
    num_classes: int,
    roi_size: Sequence[int],
    encoder_state: Mapping[str, torch.Tensor] | None = None,
    feature_size: int = 16,
    norm_name: str = "instance",
) -> tuple[nn.Module, str]:
    """``(network, encoder_prefix)``; architecture details the config does not fix (depth, qkv
    bias, Swin depths / heads / window) are read from ``encoder_state`` when given, so the
    pretrained and the scratch network of a pair are the same architecture."""
    roi = tuple(int(s) for s in roi_size)
    backbone = model_cfg.backbone
    if backbone == "vit":
        layers, qkv_bias = model_cfg.num_layers, False
        if encoder_state is not None:
            sd, _ = adapt_vit_state(encoder_state)
            layers = vit_num_layers(sd) or layers
            qkv_bias = "blocks.0.attn.qkv.bias" in sd
        net = ViTUNETR(model_cfg.in_channels, num_classes, roi, num_layers=layers, feature_size=feature_size,
                       hidden_size=model_cfg.hidden_size, mlp_dim=model_cfg.mlp_dim, num_heads=model_cfg.num_heads,
                       norm_name=norm_name, dropout_rate=model_cfg.dropout, qkv_bias=qkv_bias,
                       patch_size=model_cfg.patch_size)
        return net, ENCODER_PREFIX["vit"]
    if backbone == "swin":
        if encoder_state is not None:
            args = infer_swin_args(encoder_state)
        else:
            args = {"in_channels": model_cfg.in_channels, "feature_size": model_cfg.swin_feature_size,
                    "patch_size": 2, "depths": tuple(model_cfg.swin_depths), "num_heads": tuple(model_cfg.swin_heads),
                    "window_size": model_cfg.swin_window_size, "use_v2": False}
        net = SwinUNETR(out_channels=num_classes, norm_name=norm_name, **args)  # type: ignore[arg-type]
        return net, ENCODER_PREFIX["swin"]
    if backbone == "convvit":
        return _build_convvit_unetr(model_cfg, num_classes, roi, feature_size, norm_name), ENCODER_PREFIX["convvit"]
    raise ValueError(f"model.backbone should be one of ('vit', 'swin', 'convvit'), got {backbone!r}.")


def _build_convvit_unetr(model_cfg: ModelConfig, num_classes: int, roi: tuple[int, ...], feature_size: int,
                         norm_name: str) -> nn.Module:
    """UNETR decoder on the hybrid ConvViT encoder: its ``forward`` returns ``(tokens, hidden)``
    like MONAI's ViT, so it takes the place of ``UNETR.vit`` (skips from 1/4, 1/2, 3/4 depth)."""
    import dataclasses

    from raymim.models import build_encoder

    if len(set(roi)) != 1:
        raise ValueError(f"the convvit encoder takes cubic inputs, got roi_size={roi}.")
    net = ViTUNETR(model_cfg.in_channels, num_classes, roi, num_layers=1, feature_size=feature_size,
                   hidden_size=model_cfg.hidden_size, mlp_dim=model_cfg.mlp_dim, num_heads=model_cfg.num_heads,
                   norm_name=norm_name, dropout_rate=model_cfg.dropout, patch_size=model_cfg.patch_size)
    net.vit = build_encoder(dataclasses.replace(model_cfg, img_size=int(roi[0])))
    layers = model_cfg.num_layers
    net.num_layers, net.skips = layers, (layers // 4, layers // 2, (3 * layers) // 4)
    return net


def encoder_of(net: nn.Module, prefix: str) -> nn.Module:
    return getattr(net, prefix.rstrip("."))


def freeze_encoder(net: nn.Module, prefix: str) -> int:
    """Freeze the encoder's parameters (linear-probe style); returns how many were frozen."""
    n = 0
    for p in encoder_of(net, prefix).parameters():
        p.requires_grad_(False)
        n += 1
    return n
