"""Backbones (ViT on MONAI's ViT, MONAI SwinTransformer, hybrid ConvViT), decoders and heads.

``BACKBONES`` maps ``model.backbone`` names to builders; ``build_encoder(model_cfg)`` builds one.
"""

from raymim.models.convvit import ConvViTEncoder
from raymim.models.heads import LinearHead, MAEDecoder, PixelShuffleHead, ProjectionHead
from raymim.models.registry import BACKBONES, build_encoder, register_backbone
from raymim.models.swin import SwinEncoder
from raymim.models.vit import TokenEncoderMixin, ViTEncoder

__all__ = [
    "BACKBONES",
    "ConvViTEncoder",
    "LinearHead",
    "MAEDecoder",
    "PixelShuffleHead",
    "ProjectionHead",
    "SwinEncoder",
    "TokenEncoderMixin",
    "ViTEncoder",
    "build_encoder",
    "register_backbone",
]
