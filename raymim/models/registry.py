"""Backbone registry (timm's ``@register_model`` pattern): ``model.backbone`` -> builder.

Example::

    >>> from raymim.config import ModelConfig
    >>> enc = build_encoder(ModelConfig(img_size=32, patch_size=8, hidden_size=48, mlp_dim=96,
    ...                                 num_layers=1, num_heads=4))
    >>> sorted(BACKBONES)  # ['convvit', 'swin', 'vit']
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from raymim.config import ModelConfig
from raymim.models.convvit import ConvViTEncoder
from raymim.models.swin import SwinEncoder
from raymim.models.vit import ViTEncoder, use_fused_attention

BACKBONES: dict[str, Callable[[ModelConfig], nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[[ModelConfig], nn.Module]], Callable[[ModelConfig], nn.Module]]:
    """Decorator: ``@register_backbone("vit")`` on a ``ModelConfig -> nn.Module`` builder."""

    def wrap(fn: Callable[[ModelConfig], nn.Module]) -> Callable[[ModelConfig], nn.Module]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered.")
        BACKBONES[name] = fn
        return fn

    return wrap


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """Build the encoder named by ``cfg.backbone``, its MONAI attention blocks fused or not as
    ``cfg.fused_attention`` says (:func:`~raymim.models.vit.use_fused_attention`)."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"model.backbone should be one of {tuple(sorted(BACKBONES))}, got {cfg.backbone!r}.")
    return use_fused_attention(BACKBONES[cfg.backbone](cfg), cfg.fused_attention)


@register_backbone("vit")
def _vit(cfg: ModelConfig) -> ViTEncoder:
    return ViTEncoder(
        cfg.in_channels,
        cfg.img_size,
        cfg.patch_size,
        cfg.hidden_size,
        cfg.mlp_dim,
        cfg.num_layers,
        cfg.num_heads,
        cfg.dropout,
    )


@register_backbone("convvit")
def _convvit(cfg: ModelConfig) -> ConvViTEncoder:
    return ConvViTEncoder(
        cfg.in_channels,
        cfg.img_size,
        cfg.patch_size,
        cfg.hidden_size,
        cfg.mlp_dim,
        cfg.num_layers,
        cfg.num_heads,
        tuple(cfg.conv_channels),
        cfg.dropout,
        cfg.conv_depth,
    )


@register_backbone("swin")
def _swin(cfg: ModelConfig) -> SwinEncoder:
    return SwinEncoder(
        cfg.in_channels,
        cfg.swin_feature_size,
        cfg.swin_window_size,
        tuple(cfg.swin_depths),
        tuple(cfg.swin_heads),
        cfg.dropout,
    )
