"""`raymim export` for each format: MONAI's classes load the result; outputs match raymim's network."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR

from raymim.cli import main
from raymim.config import config_from_dict
from raymim.downstream.networks import build_segmentation_network
from raymim.export.bundle import build_bundle_network, check_metadata_structure, validate_bundle


def test_export_unetr_cli(vit_checkpoint, tmp_path):
    ckpt, enc = vit_checkpoint
    out = tmp_path / "unetr"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "unetr", "--out", str(out)]) == 0
    args = json.loads((out / "unetr_args.json").read_text())
    net = UNETR(**args, norm_name="batch").eval()
    res = net.load_state_dict(torch.load(out / "unetr_state_dict.pt", weights_only=True), strict=False)
    assert not [k for k in res.missing_keys if k.startswith("vit.")]
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.vit(x)[0], enc(x)[0])


def test_export_swinunetr_cli(swin_checkpoint, tmp_path):
    ckpt, enc = swin_checkpoint
    out = tmp_path / "swin"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "swinunetr", "--out", str(out)]) == 0
    args = json.loads((out / "swinunetr_args.json").read_text())
    a = SwinUNETR(**args, norm_name="batch").eval()
    a.load_state_dict(torch.load(out / "swinunetr_state_dict.pt", weights_only=True), strict=False)
    b = SwinUNETR(**args, norm_name="batch").eval()
    b.load_from(torch.load(out / "swinunetr_load_from.pt", weights_only=True))
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = enc(x)[-1]
        torch.testing.assert_close(a.swinViT(x)[-1], ref)
        torch.testing.assert_close(b.swinViT(x)[-1], ref)


def test_export_wrong_backbone_is_an_error(vit_checkpoint, tmp_path):
    ckpt, _ = vit_checkpoint
    with pytest.raises(ValueError, match="model.backbone='vit'"):
        main(["export", "--checkpoint", str(ckpt), "--format", "swinunetr", "--out", str(tmp_path / "x")])


def test_monai_bundle_round_trip(vit_checkpoint, tmp_path):
    ckpt, enc = vit_checkpoint
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "monai-bundle", "--out", str(out),
                 "--num-classes", "3"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["structure_ok"] and report["network_ok"] and report["schema_validated"] is False
    # MONAI's network from the bundle's own config, weights from models/model.pt ...
    infer = json.loads((out / "configs" / "inference.json").read_text())
    net = build_bundle_network(infer["network_def"]).eval()
    assert type(net) is UNETR
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True), strict=True)
    # ... gives the same output as raymim's fine-tuning network with the same weights.
    cfg = config_from_dict({"model": {"backbone": "vit", "img_size": 32, "hidden_size": 48, "mlp_dim": 96,
                                      "num_layers": 12, "num_heads": 4}})
    ours, _ = build_segmentation_network(cfg.model, 3, (32, 32, 32), enc.state_dict(), norm_name="batch")
    ours.load_state_dict(net.state_dict(), strict=True)
    ours.eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), net(x))
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert check_metadata_structure(meta) == []
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert any("channel_def" in p for p in check_metadata_structure(meta))


def test_verify_metadata_uses_a_local_schema_without_download(vit_checkpoint, tmp_path):
    """The mechanism only: MONAI's verify_metadata validates against a local schema file without
    downloading. This minimal schema is written here for the test; it is NOT MONAI's schema (which
    is not shipped in the monai package)."""
    ckpt, _ = vit_checkpoint
    out = tmp_path / "bundle"
    main(["export", "--checkpoint", str(ckpt), "--format", "monai-bundle", "--out", str(out)])
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["version", "network_data_format"]}))
    assert validate_bundle(out, schema_file=schema, check_network=False)["schema_validated"]
    schema.write_text(json.dumps({"type": "object", "required": ["no_such_key"]}))
    with pytest.raises(ValueError):
        validate_bundle(out, schema_file=schema, check_network=False)
