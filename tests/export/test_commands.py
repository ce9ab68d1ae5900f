"""`raymim export` for each format: MONAI's classes load the result; outputs match raymim's network."""

from __future__ import annotations

import json

import pytest
import torch
from export_fixtures import VIT
from monai.networks.nets import UNETR, SwinUNETR, ViT

from raymim.cli import main
from raymim.config import config_from_dict
from raymim.downstream.networks import build_segmentation_network
from raymim.export.bundle import build_bundle_network, check_metadata_structure, validate_bundle
from raymim.export.commands import ExportRefused, export_checkpoint
from raymim.train.checkpoint import write_checkpoint
from raymim.weights import EncoderKeyError


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


def _refused(argv, capsys) -> str:
    """Run ``raymim export`` expecting a refusal: exit 2 and one stderr line; returns that line."""
    capsys.readouterr()
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymim export: "), err
    assert "Traceback" not in err
    return lines[0]


def test_export_wrong_backbone_is_refused(vit_checkpoint, tmp_path, capsys):
    ckpt, _ = vit_checkpoint
    out = tmp_path / "x"
    line = _refused(["--checkpoint", str(ckpt), "--format", "swinunetr", "--out", str(out)], capsys)
    assert "model.backbone='vit'" in line and "--format unetr or --format monai-bundle" in line
    assert not out.exists()
    with pytest.raises(ExportRefused, match="needs a swin encoder"):  # the Python API raises instead
        export_checkpoint(str(ckpt), "swinunetr", out)
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["unetr", "monai-bundle"])
@pytest.mark.parametrize("layers,patch,img,problem", [(2, 16, 32, "num_layers=2"), (12, 8, 32, "patch_size=8"),
                                                       (2, 8, 32, "num_layers=2, patch_size=8")])
def test_non_unetr_vit_is_refused_before_writing(fmt, layers, patch, img, problem, tmp_path, capsys):
    """A ViT of another depth or patch size than MONAI UNETR's 12 / 16: one line, exit 2, no --out."""
    torch.manual_seed(0)
    enc = ViT(1, img, patch, hidden_size=48, mlp_dim=96, num_layers=layers, num_heads=4)
    cfg = config_from_dict({"model": {**VIT, "patch_size": patch, "num_layers": layers}})
    ckpt = write_checkpoint(tmp_path / "ckpt", state={}, encoder_state=enc.state_dict(), cfg=cfg, meta={})
    out = tmp_path / "deep" / "out"
    line = _refused(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)], capsys)
    assert f"needs a 12-layer, patch-16 ViT; this encoder has {problem};" in line
    assert "model.num_layers=12 and model.patch_size=16" in line and "raymim finetune" in line
    assert not out.exists() and not out.parent.exists()


def test_export_refusals_name_what_would_work(vit_checkpoint, tmp_path, capsys):
    ckpt, _ = vit_checkpoint
    out = tmp_path / "out"
    base = ["--checkpoint", str(ckpt), "--out", str(out)]
    line = _refused([*base, "--format", "unetr", "--img-size", "40"], capsys)
    assert "--img-size 40 is not a multiple of the patch size 16; pass --img-size 32 or 48" in line
    line = _refused([*base, "--format", "unetr", "--set", "model.hidden_size=96"], capsys)
    assert "model.hidden_size=96 but the encoder's weights have hidden_size=48" in line
    line = _refused([*base, "--format", "monai-bundle", "--schema", str(tmp_path / "no-schema.json")], capsys)
    assert "no such file" in line
    line = _refused(["--checkpoint", str(tmp_path / "missing"), "--format", "unetr", "--out", str(out)], capsys)
    assert "runs:/<mlflow_run_id>/encoder" in line
    assert not out.exists()
    out.write_text("a file")
    assert "is a file" in _refused([*base, "--format", "unetr"], capsys)


def test_swin_bundle_size_and_convvit_formats_are_refused(swin_checkpoint, convvit_checkpoint, tmp_path, capsys):
    ckpt, _ = swin_checkpoint
    out = tmp_path / "out"
    line = _refused(["--checkpoint", str(ckpt), "--format", "monai-bundle", "--out", str(out), "--img-size", "48"],
                    capsys)
    assert "divisible by 32" in line and "--img-size 32 or 64" in line
    conv, _ = convvit_checkpoint
    line = _refused(["--checkpoint", str(conv), "--format", "unetr", "--out", str(out)], capsys)
    assert "model.backbone='convvit'" in line and "--format monai-bundle" in line
    line = _refused(["--checkpoint", str(conv), "--format", "monai-bundle", "--out", str(out), "--img-size", "36"],
                    capsys)
    assert "multiple of the patch size 8" in line and "--img-size 32 or 40" in line
    assert not out.exists()


def test_a_failure_after_the_checks_removes_the_out_folder_it_created(vit_checkpoint, tmp_path):
    """The weights are still loaded into MONAI's class after the up-front checks; if that fails,
    the folder the export created is removed (an existing one is left in place)."""
    ckpt, enc = vit_checkpoint
    state = enc.state_dict()
    state.pop("blocks.3.attn.qkv.weight")
    cfg = config_from_dict({"model": VIT})
    broken = write_checkpoint(tmp_path / "broken", state={}, encoder_state=state, cfg=cfg, meta={})
    out = tmp_path / "new"
    with pytest.raises(EncoderKeyError, match="blocks.3.attn.qkv"):
        export_checkpoint(str(broken), "unetr", out)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(EncoderKeyError):
        export_checkpoint(str(broken), "monai-bundle", existing)
    assert existing.is_dir()


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


@pytest.mark.parametrize("backbone", ["vit", "swin", "convvit"])
def test_every_backbone_round_trips_through_a_bundle_and_finetune(backbone, vit_checkpoint, swin_checkpoint,
                                                                  convvit_checkpoint, tmp_path):
    """pretrained encoder -> `raymim export --format monai-bundle` -> the bundle's own network_def and
    model.pt: the encoder weights are the pretrained ones, unchanged, and the network `raymim finetune
    --pretrained` builds (same loader) is the same architecture and gives the same output."""
    from raymim.weights import ENCODER_PREFIX, load_encoder, load_pretrained

    ckpt, enc = {"vit": vit_checkpoint, "swin": swin_checkpoint, "convvit": convvit_checkpoint}[backbone]
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "monai-bundle", "--out", str(out),
                 "--num-classes", "2"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["structure_ok"] and report["network_ok"]  # MONAI's verify_net_in_out ran on the bundle
    infer = json.loads((out / "configs" / "inference.json").read_text())
    net = build_bundle_network(infer["network_def"]).eval()
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True), strict=True)
    prefix = ENCODER_PREFIX[backbone]
    bundled = {k[len(prefix):]: v for k, v in net.state_dict().items() if k.startswith(prefix)}
    for key, value in enc.state_dict().items():
        torch.testing.assert_close(bundled[key], value)  # every pretrained encoder weight, unchanged
    # the fine-tuning side: load_pretrained + build_segmentation_network + load_encoder
    state, cfg = load_pretrained(ckpt)
    ours, p = build_segmentation_network(cfg.model, 2, (32, 32, 32), state, norm_name="batch")
    assert p == prefix and load_encoder(ours, state, cfg.model, (32, 32, 32))["missing_encoder"] == []
    ours.load_state_dict(net.state_dict(), strict=True)  # same architecture, key for key
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), net(x))
    if backbone == "convvit":
        meta = json.loads((out / "configs" / "metadata.json").read_text())
        assert infer["network_def"]["_target_"] == "raymim.models.unetr.ConvViTUNETR"
        assert "raymim" in meta["required_packages_version"]
