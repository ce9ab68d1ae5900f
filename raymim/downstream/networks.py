"""Segmentation networks around a pretrained encoder (weights go in with :func:`raymim.weights.load_encoder`).

- ``vit``: MONAI ``UNETR``. MONAI hard-codes 12 transformer layers and patch 16;
  :class:`~raymim.models.unetr.ViTUNETR` is the same class with the encoder depth taken from the
  config (or the encoder's weights) and patch 8 supported.
- ``swin``: MONAI ``SwinUNETR``; its ``swinViT`` is the encoder.
- ``convvit``: :class:`~raymim.models.unetr.ConvViTUNETR`, the UNETR decoder on raymim's hybrid
  ConvViT encoder (the network a ConvViT MONAI bundle holds too); the encoder's depth, conv
  stage widths and blocks per stage are read from its weights when given.

Example::

    net, prefix = build_segmentation_network(cfg.model, num_classes=3, roi_size=(32, 32, 32))
    report = raymim.weights.load_encoder(net, encoder_state, cfg.model, roi_size=(32, 32, 32))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from raymim.config import ModelConfig
from raymim.models.unetr import ConvViTUNETR, ViTUNETR
from raymim.weights import ENCODER_PREFIX, adapt_vit_state, convvit_unetr_args, infer_swin_args, vit_num_layers


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
        args = convvit_unetr_args(model_cfg, encoder_state, num_classes, roi, feature_size, norm_name)
        return ConvViTUNETR(**args), ENCODER_PREFIX["convvit"]  # type: ignore[arg-type]
    raise ValueError(f"model.backbone should be one of ('vit', 'swin', 'convvit'), got {backbone!r}.")


def encoder_of(net: nn.Module, prefix: str) -> nn.Module:
    return getattr(net, prefix.rstrip("."))


def freeze_encoder(net: nn.Module, prefix: str) -> int:
    """Freeze the encoder's parameters (linear-probe style); returns how many were frozen."""
    n = 0
    for p in encoder_of(net, prefix).parameters():
        p.requires_grad_(False)
        n += 1
    return n
