"""Round trips: raymim encoder state -> MONAI UNETR / SwinUNETR, zero missing encoder keys, same outputs."""

from __future__ import annotations

import pytest
import torch
from export_fixtures import SWIN, tiny_swin, tiny_vit
from monai.networks.nets import UNETR, SwinUNETR

from raymim.weights import (
    EncoderKeyError,
    check_encoder_load,
    infer_swin_args,
    interpolate_pos_embed,
    strip_prefixes,
    to_swinunetr_load_from,
    to_swinunetr_state_dict,
    to_unetr_state_dict,
)

X32 = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))


def _unetr(img_size=32):
    return UNETR(1, 3, img_size, hidden_size=48, mlp_dim=96, num_heads=4, norm_name="batch").eval()


def test_unetr_round_trip_zero_missing_and_same_output():
    enc = tiny_vit()
    net = _unetr()
    res = net.load_state_dict(to_unetr_state_dict(enc.state_dict()), strict=False)
    report = check_encoder_load(res.missing_keys, res.unexpected_keys, "vit.")
    assert report["missing_encoder"] == [] and report["unexpected"] == []
    with torch.no_grad():
        ours, hidden = enc(X32)
        theirs, hidden2 = net.vit(X32)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(hidden[9], hidden2[9])


def test_unetr_wrappers_and_timm_names():
    sd = tiny_vit().state_dict()
    peer = {}
    for k, v in sd.items():
        k = k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2").replace("attn.out_proj", "attn.proj")
        if "norm_cross_attn" in k:
            continue  # peers' checkpoints do not carry MONAI's unused cross-attention norms
        peer[f"module.encoder.{k}"] = v
    res = _unetr().load_state_dict(to_unetr_state_dict(peer), strict=False)
    assert not [k for k in res.missing_keys if k.startswith("vit.")] and not res.unexpected_keys


def test_unetr_pos_embed_interpolation():
    enc = tiny_vit(img_size=32)
    sd = to_unetr_state_dict(enc.state_dict(), img_size=64)
    net = _unetr(64)
    res = net.load_state_dict(sd, strict=False)
    assert not [k for k in res.missing_keys if k.startswith("vit.")]
    pe = net.vit.patch_embedding.position_embeddings
    assert pe.shape == (1, 64, 48)
    # A constant field stays constant under trilinear interpolation; a grid maps onto itself.
    const = torch.ones(1, 8, 3)
    torch.testing.assert_close(interpolate_pos_embed(const, (2, 2, 2), (4, 4, 4)), torch.ones(1, 64, 3))
    src = enc.state_dict()["patch_embedding.position_embeddings"]
    torch.testing.assert_close(interpolate_pos_embed(src, (2, 2, 2), (2, 2, 2)), src)
    with torch.no_grad():
        assert net(torch.rand(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)


def test_unetr_refuses_other_depths():
    with pytest.raises(ValueError, match="num_layers=2"):
        to_unetr_state_dict(tiny_vit(num_layers=2).state_dict())


def test_missing_encoder_key_fails():
    sd = to_unetr_state_dict(tiny_vit().state_dict())
    sd.pop("vit.blocks.3.attn.qkv.weight")
    res = _unetr().load_state_dict(sd, strict=False)
    with pytest.raises(EncoderKeyError, match="blocks.3.attn.qkv"):
        check_encoder_load(res.missing_keys, res.unexpected_keys, "vit.")


def _swinunetr():
    return SwinUNETR(1, 2, norm_name="batch", **SWIN).eval()


def test_swinunetr_round_trip_state_dict_and_load_from():
    enc = tiny_swin(seed=1)
    args = infer_swin_args(enc.state_dict())
    assert args["depths"] == SWIN["depths"] and args["num_heads"] == SWIN["num_heads"]
    assert (args["window_size"], args["feature_size"], args["patch_size"]) == (4, 12, 2)
    a = _swinunetr()
    res = a.load_state_dict(to_swinunetr_state_dict({f"module.{k}": v for k, v in enc.state_dict().items()}),
                            strict=False)
    assert not [k for k in res.missing_keys if k.startswith("swinViT.")] and not res.unexpected_keys
    b = _swinunetr()
    weights = to_swinunetr_load_from(enc.state_dict())
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in weights["state_dict"]
    b.load_from(weights)
    with torch.no_grad():
        ref = enc(X32)
        for net in (a, b):
            for r, o in zip(ref, net.swinViT(X32)):
                torch.testing.assert_close(r, o)


def test_strip_prefixes():
    assert list(strip_prefixes({"module._orig_mod.encoder.x.y": 1})) == ["x.y"]


def test_convvit_round_trip_zero_missing_same_output_and_layout():
    """A ConvViT encoder state (wrapped as a method's checkpoint) fills raymim's ConvViT-UNETR with
    zero missing encoder keys and the same encoding; its shape is read back from the weights."""
    from export_fixtures import CONVVIT, tiny_convvit

    from raymim.config import ModelConfig
    from raymim.models.unetr import ConvViTUNETR
    from raymim.weights import convvit_layout, convvit_unetr_args, load_encoder

    enc = tiny_convvit(seed=2)
    wrapped = {f"module.encoder.{k}": v for k, v in enc.state_dict().items()}
    layout = convvit_layout(wrapped)
    assert layout == {"num_layers": 2, "conv_channels": [8, 16], "conv_depth": 1, "hidden_size": 48, "mlp_dim": 96,
                      "in_channels": 1}
    scratch_cfg = ModelConfig(**{**CONVVIT, "num_layers": 5, "conv_channels": [4, 4], "conv_depth": 3})
    net = ConvViTUNETR(**convvit_unetr_args(scratch_cfg, wrapped, 3, (32, 32, 32), norm_name="batch")).eval()
    report = load_encoder(net, wrapped, scratch_cfg, (32, 32, 32))
    assert report["missing_encoder"] == [] and report["loaded"] == len(enc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net.vit(X32)[0], enc(X32)[0])
    # another ROI: the position embeddings are interpolated on the token grid, every key still loads
    big = ConvViTUNETR(**convvit_unetr_args(scratch_cfg, wrapped, 3, (48, 48, 48), norm_name="batch"))
    report = load_encoder(big, wrapped, scratch_cfg, (48, 48, 48))
    assert report["interpolated"] and report["missing_encoder"] == []
    with pytest.raises(EncoderKeyError, match="not a ConvViT"):
        convvit_layout(tiny_vit().state_dict())
