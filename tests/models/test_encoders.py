"""Encoders: MONAI key layouts, visible-only probes, mask-token forwards, heads, registry."""

from __future__ import annotations

import pytest
import torch

from raymim.config import ModelConfig
from raymim.masking import random_masking
from raymim.models import (
    BACKBONES,
    ConvViTEncoder,
    MAEDecoder,
    PixelShuffleHead,
    SwinEncoder,
    ViTEncoder,
    build_encoder,
)


def _tiny_vit(**kw) -> ViTEncoder:
    args = dict(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4)
    args.update(kw)
    return ViTEncoder(**args)


def _tiny_convvit() -> ConvViTEncoder:
    return ConvViTEncoder(1, 32, 8, 48, 96, 1, 4, conv_channels=(8, 16))


def test_vit_state_dict_loads_into_unetr():
    from monai.networks.nets import UNETR

    enc = _tiny_vit(patch_size=16, num_layers=12)  # UNETR: patch 16, 12 layers
    unetr = UNETR(1, 2, 32, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)
    result = unetr.vit.load_state_dict(enc.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.rand(1, 1, 32, 32, 32)
    # UNETR's blocks use MONAI's einsum attention, ours torch's fused kernel: equal to float rounding
    torch.testing.assert_close(unetr.vit(x)[0], enc(x)[0], rtol=1e-5, atol=1e-5)


def test_swin_state_dict_loads_into_swinunetr():
    from monai.networks.nets import SwinUNETR

    enc = SwinEncoder(1, 12, 4, (1, 1, 1, 1), (1, 1, 2, 2))
    net = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4
    )
    result = net.swinViT.load_state_dict(enc.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_convvit])
def test_visible_only_never_sees_masked_voxels(make):
    torch.manual_seed(0)
    enc = make().eval()
    x = torch.rand(2, 1, 32, 32, 32)
    m = random_masking(2, enc.num_tokens, 0.75)
    out = enc.forward_visible(x, m.ids_keep)
    assert out.shape == (2, 16, 48)
    # perturb every masked voxel: the visible-only encoding must not change
    from raymim.masking import mask_to_volume

    vox = mask_to_volume(m.mask, enc.grid, (32, 32, 32))
    x2 = x + vox * torch.randn_like(x) * 10
    assert torch.allclose(enc.forward_visible(x2, m.ids_keep), out, atol=1e-5)
    # ...while perturbing a visible voxel does
    x3 = x + (1 - vox) * torch.randn_like(x)
    assert not torch.allclose(enc.forward_visible(x3, m.ids_keep), out, atol=1e-4)


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_convvit])
def test_mask_token_forward(make):
    enc = make()
    m = random_masking(2, enc.num_tokens, 0.6)
    out = enc.forward_masked(torch.rand(2, 1, 32, 32, 32), m.mask, torch.zeros(1, 1, 48))
    assert out.shape == (2, 64, 48)
    assert enc.forward_tokens(torch.rand(1, 1, 32, 32, 32)).shape == (1, 64, 48)


def test_swin_masked_forward_and_head():
    enc = SwinEncoder(1, 12, 4, (1, 1, 1, 1), (1, 1, 2, 2))
    outs = enc.forward_masked(torch.rand(1, 1, 32, 32, 32), torch.ones(1, 1, 16, 16, 16), torch.zeros(12))
    assert [o.shape[1] for o in outs] == [12, 24, 48, 96, 192] and outs[-1].shape[2:] == (1, 1, 1)
    assert PixelShuffleHead(192, 1, 32)(outs[-1]).shape == (1, 1, 32, 32, 32)


def test_mae_decoder_shapes():
    dec = MAEDecoder((4, 4, 4), in_dim=48, hidden_size=48, num_layers=1, num_heads=4, out_dim=512)
    m = random_masking(2, 64, 0.75)
    pred, feats = dec(torch.rand(2, 16, 48), m.ids_restore)
    assert pred.shape == (2, 64, 512) and feats.shape == (2, 64, 48)


def test_registry_builds_every_backbone():
    assert sorted(BACKBONES) == ["convvit", "swin", "vit"]
    base = dict(
        img_size=32,
        patch_size=8,
        hidden_size=48,
        mlp_dim=96,
        num_layers=1,
        num_heads=4,
        swin_feature_size=12,
        swin_window_size=4,
        swin_depths=[1, 1, 1, 1],
        swin_heads=[1, 1, 2, 2],
        conv_channels=[8, 16],
    )
    kinds = {"vit": ViTEncoder, "convvit": ConvViTEncoder, "swin": SwinEncoder}
    for name, cls in kinds.items():
        assert isinstance(build_encoder(ModelConfig(backbone=name, **base)), cls)
    with pytest.raises(ValueError, match="model.backbone should be one of"):
        ModelConfig(backbone="resnet")
