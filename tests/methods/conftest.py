"""Tiny configs and a phantom volume shared by the method tests (CPU, 32^3)."""

from __future__ import annotations

import pytest
import torch

from raymim.config import ModelConfig, RaymimConfig, method_config

# (method name, backbone) pairs the shared contract runs; a new method adds itself here.
CASES = [
    ("mae", "vit"),
    ("mae", "convvit"),
    ("simmim", "vit"),
    ("simmim", "swin"),
    ("simmim", "convvit"),
    ("mim", "vit"),
    ("mim", "convvit"),
    ("mps_ams", "vit"),
    ("mps_ams", "convvit"),
    ("medim", "vit"),
    ("hssl", "vit"),
    ("simclr", "vit"),
]


def tiny_config(name: str, backbone: str = "vit", **method: object) -> RaymimConfig:
    """ViT hidden 48 / 1 layer at 32^3 with patch 8 (64 tokens); MiM / MPS-AMS with 2 levels.
    ``method``: fields of method ``name``'s own config (another method's field is a ConfigError)."""
    model = ModelConfig(
        backbone=backbone,
        img_size=32,
        patch_size=8,
        hidden_size=48,
        mlp_dim=96,
        num_layers=1,
        num_heads=4,
        decoder_hidden_size=48,
        decoder_layers=1,
        decoder_heads=4,
        swin_feature_size=12,
        swin_window_size=4,
        swin_depths=[1, 1, 1, 1],
        swin_heads=[1, 1, 2, 2],
        conv_channels=[8, 16],
    )
    kwargs: dict = {"levels": 2, "level_sizes": [32, 16], "gamma": 2} if name in ("mim", "mps_ams") else {}
    kwargs.update(method)
    return RaymimConfig(model=model, method=method_config(name, **kwargs))


def phantom(size: int = 32, seed: int = 0) -> torch.Tensor:
    """A body-like ellipsoid with two organs and a bright lesion, values in [0, 1]: [1, 1, S, S, S]."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, size),) * 3, indexing="ij")
    vol = 0.2 * ((z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 < 1).float()
    vol += 0.3 * (((z - 0.2) / 0.4) ** 2 + ((y + 0.2) / 0.3) ** 2 + ((x - 0.1) / 0.35) ** 2 < 1).float()
    vol += 0.2 * (((z + 0.3) / 0.3) ** 2 + ((y - 0.3) / 0.25) ** 2 + ((x + 0.2) / 0.3) ** 2 < 1).float()
    vol += 0.3 * ((z - 0.1) ** 2 + (y + 0.1) ** 2 + (x + 0.3) ** 2 < 0.12**2).float()
    vol += 0.005 * torch.randn(vol.shape, generator=g)
    return vol.clamp(0, 1)[None, None]


@pytest.fixture
def volume() -> torch.Tensor:
    return phantom()
