"""Tiny encoders in raymim's layouts (MONAI ViT keys / MONAI SwinTransformer / hybrid ConvViT), shared by the
export tests."""

from __future__ import annotations

import torch
from monai.networks.nets import SwinUNETR, ViT

VIT = dict(backbone="vit", img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=12, num_heads=4)
CONVVIT = dict(backbone="convvit", img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4,
               conv_channels=[8, 16], conv_depth=1)
SWIN = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), window_size=4)


def tiny_vit(num_layers: int = 12, img_size: int = 32, seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(1, img_size, 16, hidden_size=48, mlp_dim=96, num_layers=num_layers, num_heads=4).eval()


def tiny_swin(seed: int = 0):
    torch.manual_seed(seed)
    return SwinUNETR(1, 2, norm_name="batch", **SWIN).swinViT.eval()



def tiny_convvit(seed: int = 0):
    from raymim.config import ModelConfig
    from raymim.models import build_encoder

    torch.manual_seed(seed)
    return build_encoder(ModelConfig(**CONVVIT)).eval()
