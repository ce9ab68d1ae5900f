"""Hybrid ConvViT: mask-independent normalisation, no leak in either masked forward, stage fusion."""

from __future__ import annotations

import torch

from raymim.masking import mask_to_volume, random_masking
from raymim.models import ConvViTEncoder
from raymim.models.convvit import ChannelLayerNorm


def _enc(**kw) -> ConvViTEncoder:
    args = dict(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4,
                conv_channels=(8, 16))
    args.update(kw)
    torch.manual_seed(0)
    return ConvViTEncoder(**args).eval()


def test_conv_stages_use_channel_layernorm_not_instance_norm():
    enc = _enc()
    norms = [m for m in enc.conv_stages.modules() if isinstance(m, torch.nn.modules.normalization.LayerNorm)]
    assert norms and all(isinstance(m, ChannelLayerNorm) for m in norms)
    assert not [m for m in enc.modules() if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm)]
    keys = set(enc.state_dict())
    assert {"conv_stages.0.embed.proj.weight", "conv_stages.0.embed.norm.weight",
            "conv_stages.1.blocks.1.dwconv.weight", "stage_fuse.0.weight", "stage_fuse.1.weight",
            "patch_embedding.position_embeddings"} <= keys


def test_visible_features_do_not_depend_on_distant_mask_changes():
    """A visible token's conv features depend on its neighbourhood only: masking one more token far
    away leaves them unchanged (with InstanceNorm, its per-volume statistics would move them)."""
    enc = _enc(conv_depth=1)  # receptive field of the conv stages: under 2 tokens
    x = torch.rand(1, 1, 32, 32, 32)
    a = torch.zeros(1, 64)
    a[0, 21] = 1.0  # token (1, 1, 1) masked
    b = a.clone()
    b[0, 63] = 1.0  # ...and token (3, 3, 3), far from token (0, 0, 0)
    fa, fb = enc.forward_features(x, a), enc.forward_features(x, b)
    for f_a, f_b in zip(fa, fb):
        s = f_a.shape[-1] // 4  # voxels per token at this stage
        assert torch.allclose(f_a[..., :s, :s, :s], f_b[..., :s, :s, :s], atol=1e-6)
        assert not torch.allclose(f_a[..., -s:, -s:, -s:], f_b[..., -s:, -s:, -s:])  # the masked token did change


def test_simmim_forward_never_sees_masked_voxels():
    """With mask tokens and fused stage tokens, masked voxels still cannot reach any output."""
    enc = _enc()
    x = torch.rand(2, 1, 32, 32, 32)
    m = random_masking(2, enc.num_tokens, 0.6)
    token = torch.randn(1, 1, 48)
    out = enc.forward_masked(x, m.mask, token)
    vox = mask_to_volume(m.mask, enc.grid, (32, 32, 32))
    assert torch.allclose(enc.forward_masked(x + vox * torch.randn_like(x) * 10, m.mask, token), out, atol=1e-5)
    assert not torch.allclose(enc.forward_masked(x + (1 - vox) * torch.randn_like(x), m.mask, token), out, atol=1e-4)


def test_stage_outputs_are_fused_into_the_tokens():
    """Every stage's fused tokens are added to the transformer output (ConvMAE): silencing one
    stage's fusion changes the encoding, and the visible-only encoding is the full one gathered
    at the kept tokens when nothing is masked."""
    enc = _enc()
    x = torch.rand(1, 1, 32, 32, 32)
    full = enc.forward_tokens(x)
    keep_all = torch.arange(64).unsqueeze(0)
    assert torch.allclose(enc.forward_visible(x, keep_all), full, atol=1e-5)
    for s in range(2):
        with torch.no_grad():
            w, b = enc.stage_fuse[s].weight.clone(), enc.stage_fuse[s].bias.clone()
            enc.stage_fuse[s].weight.zero_()
            enc.stage_fuse[s].bias.zero_()
        assert not torch.allclose(enc.forward_tokens(x), full, atol=1e-4)
        with torch.no_grad():
            enc.stage_fuse[s].weight.copy_(w)
            enc.stage_fuse[s].bias.copy_(b)
    tokens, hidden = enc(x)
    assert torch.allclose(tokens, full) and len(hidden) == 1
