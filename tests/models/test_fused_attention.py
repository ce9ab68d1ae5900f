"""Fused attention (torch ``scaled_dot_product_attention`` through MONAI's ``use_flash_attention``):
same outputs and gradients as MONAI's einsum path, same ``state_dict`` keys, checkpoints load across."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import ViT
from monai.networks.nets.swin_unetr import WindowAttention

from raymim.config import ModelConfig
from raymim.masking.tokens import random_masking
from raymim.models import MAEDecoder, ViTEncoder, build_encoder
from raymim.models.vit import use_fused_attention

TINY = dict(img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4,
            swin_feature_size=12, swin_window_size=4, swin_depths=[1, 1, 1, 1], swin_heads=[1, 1, 2, 2],
            conv_channels=[8, 16])


def _flags(module: torch.nn.Module) -> list[bool]:
    return [m.use_flash_attention for m in module.modules() if isinstance(m, SABlock | WindowAttention)]


def _pair(backbone: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = ModelConfig(backbone=backbone, **TINY)
    torch.manual_seed(0)
    fused = build_encoder(cfg)
    torch.manual_seed(0)
    plain = build_encoder(dataclasses.replace(cfg, fused_attention=False))
    return fused, plain


def test_default_config_fuses_every_token_block():
    assert ModelConfig().fused_attention is True
    for backbone in ("vit", "convvit", "swin"):
        fused, plain = _pair(backbone)
        assert _flags(fused) and all(_flags(fused)), backbone
        assert not any(_flags(plain)), backbone
    dec = MAEDecoder((4, 4, 4), 48, 48, 1, 4, out_dim=512)
    assert all(_flags(dec)) and not any(_flags(MAEDecoder((4, 4, 4), 48, 48, 1, 4, 512, fused_attention=False)))


@pytest.mark.parametrize("backbone", ["vit", "convvit"])
def test_fused_matches_einsum_forward_and_backward(backbone: str):
    fused, plain = _pair(backbone)
    assert torch.equal(torch.cat([p.flatten() for p in fused.parameters()]),
                       torch.cat([p.flatten() for p in plain.parameters()]))  # same draw: fusing consumes no RNG
    x = torch.rand(2, 1, 32, 32, 32)
    tm = random_masking(2, fused.num_tokens, 0.75, generator=torch.Generator().manual_seed(0))
    outs = []
    for enc in (fused, plain):
        vis = enc.forward_visible(x, tm.ids_keep)
        full = enc.forward_masked(x, tm.mask, torch.zeros(1, 1, 48))
        (vis.square().mean() + full.square().mean()).backward()
        outs.append((vis, full, [None if p.grad is None else p.grad.clone() for p in enc.parameters()]))
    (v1, f1, g1), (v2, f2, g2) = outs
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f1, f2, rtol=1e-5, atol=1e-5)
    assert [g is None for g in g1] == [g is None for g in g2] and sum(g is not None for g in g1) > 10
    for a, b in zip(g1, g2, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_decoder_matches_einsum():
    torch.manual_seed(0)
    fused = MAEDecoder((4, 4, 4), 48, 48, 2, 4, out_dim=512)
    plain = MAEDecoder((4, 4, 4), 48, 48, 2, 4, out_dim=512, fused_attention=False)
    plain.load_state_dict(fused.state_dict())
    latent = torch.randn(2, 16, 48)
    ids = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(1)).ids_restore
    for a, b in zip(fused(latent, ids), plain(latent, ids), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swin_fused_only_without_autograd_and_equal():
    """MONAI 1.6 uses Swin's fused window attention only with autograd off; outputs agree there."""
    fused, plain = _pair("swin")
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(fused(x), plain(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_keys_unchanged_and_old_checkpoints_load(tmp_path):
    """An encoder saved with the einsum path (every checkpoint before this flag) loads strictly into
    a fused one and gives the same features; the key set is MONAI ``ViT``'s (so UNETR's ``.vit``)."""
    kw = dict(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
    torch.manual_seed(3)
    old = ViTEncoder(**kw, fused_attention=False)
    torch.save(old.state_dict(), tmp_path / "encoder.pt")
    new = ViTEncoder(**kw)
    assert all(_flags(new))
    assert set(new.state_dict()) == set(old.state_dict())
    monai_vit = ViT(1, 32, 8, 48, 96, 2, 4, proj_type="conv", classification=False, spatial_dims=3, qkv_bias=False)
    assert set(new.state_dict()) == set(monai_vit.state_dict())
    result = new.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(new.forward_tokens(x), old.forward_tokens(x), rtol=1e-5, atol=1e-5)


def test_dropout_keeps_the_einsum_path():
    """MONAI's fused call applies its dropout rate in eval mode too, so blocks with dropout stay unfused;
    in eval mode such an encoder is deterministic."""
    enc = use_fused_attention(ViTEncoder(1, 32, 8, 48, 96, 1, 4, dropout_rate=0.1))
    assert not any(_flags(enc))
    enc.eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.forward_tokens(x), enc.forward_tokens(x))
