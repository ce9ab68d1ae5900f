"""Tiny end-to-end fine-tuning on phantoms: pretrained/scratch pairs, MLflow parent/child runs, artifacts."""

from __future__ import annotations

import mlflow
import pytest
import torch
from downstream_fixtures import FT, TINY_VIT

from raymim.cli import main
from raymim.config import config_from_dict
from raymim.downstream.evaluate import quick_finetune, run_finetune
from raymim.downstream.networks import build_segmentation_network, freeze_encoder, load_encoder
from raymim.export.converters import EncoderKeyError
from raymim.train.checkpoint import load_pretrained


def test_cli_finetune_pairs_logged(phantoms, vit_ckpt, mlflow_uri, tmp_path):
    out = tmp_path / "ft"
    sets = [f"finetune.{k}={v}" for k, v in FT.items()]
    argv = ["finetune", "--pretrained", str(vit_ckpt), "--data", str(phantoms), "--fractions", "0.5,1.0",
            "--seeds", "1", "--steps", "2", "--engine", "local", "--out", str(out)]
    for s in sets:
        argv += ["--set", s.replace("'", "")]
    assert main(argv) == 0
    for name in ("results.csv", "summary.csv", "results.md", "dice_vs_fraction.png", "split.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == 1
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("raymim")
    parents = client.search_runs([exp.experiment_id], "tags.`raymim.kind` = 'finetune'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    inits = sorted((c.data.params["fraction"], c.data.tags["raymim.init"]) for c in children)
    assert inits == [("0.5", "pretrained"), ("0.5", "scratch"), ("1.0", "pretrained"), ("1.0", "scratch")]
    assert all("test.dice.mean" in c.data.metrics for c in children)
    assert "f1.pretrained.dice_gain_vs_scratch" in parent.data.metrics
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "dice_vs_fraction.png", "overlays"} <= arts
    md = (out / "results.md").read_text()
    assert "| 0.5 | pretrained | 2 |" in md and "scratch" in md


def test_quick_finetune_api(phantoms, vit_ckpt):
    state, pcfg = load_pretrained(vit_ckpt)
    cfg = config_from_dict({"model": TINY_VIT, "finetune": {**FT, "fractions": [1.0]}})
    m = quick_finetune(state, cfg, str(phantoms), steps=2, with_scratch=True)
    for key in ("dice/mean", "nsd/mean", "hd95/mean", "ppv/mean", "sensitivity/mean", "dice/liver",
                "val/dice/mean", "scratch/dice/mean", "dice_gain_vs_scratch"):
        assert key in m, key
    assert 0.0 <= m["dice/mean"] <= 1.0


def test_encoder_load_report_freeze_and_missing_key(vit_ckpt):
    state, pcfg = load_pretrained(vit_ckpt)
    net, prefix = build_segmentation_network(pcfg.model, 4, (32, 32, 32), state, feature_size=8, norm_name="batch")
    rep = load_encoder(net, state, pcfg.model, (32, 32, 32))
    assert rep["missing_encoder"] == [] and rep["loaded"] == len(state)
    torch.testing.assert_close(net.vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert freeze_encoder(net, prefix) > 0 and not any(p.requires_grad for p in net.vit.parameters())
    broken = {k: v for k, v in state.items() if not k.startswith("blocks.1.mlp")}
    with pytest.raises(EncoderKeyError, match="blocks.1.mlp"):
        load_encoder(build_segmentation_network(pcfg.model, 4, (32, 32, 32), state)[0], broken, pcfg.model,
                     (32, 32, 32))
    # Position embeddings are interpolated when the fine-tuning ROI differs from pretraining.
    net64, _ = build_segmentation_network(pcfg.model, 4, (64, 64, 64), state, feature_size=8, norm_name="batch")
    assert load_encoder(net64, state, pcfg.model, (64, 64, 64))["interpolated"]


def test_patch8_vit_network_loads_tiny_config_encoder():
    cfg = config_from_dict({"model": {**TINY_VIT, "patch_size": 8}})
    from raymim.models import build_encoder

    state = build_encoder(cfg.model).state_dict()
    net, _ = build_segmentation_network(cfg.model, 3, (32, 32, 32), state, feature_size=8, norm_name="batch")
    assert load_encoder(net, state, cfg.model, (32, 32, 32))["missing_encoder"] == []
    net.eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_swin_and_convvit_networks():
    swin = config_from_dict({"model": {"backbone": "swin", "img_size": 32, "swin_feature_size": 12,
                                       "swin_window_size": 4, "swin_depths": [1, 1, 1, 1],
                                       "swin_heads": [3, 3, 3, 3]}})
    net, prefix = build_segmentation_network(swin.model, 3, (32, 32, 32), norm_name="batch")
    state = net.swinViT.state_dict()
    other, _ = build_segmentation_network(swin.model, 3, (32, 32, 32), state, norm_name="batch")
    assert load_encoder(other, state, swin.model, (32, 32, 32))["missing_encoder"] == []
    conv = config_from_dict({"model": {**TINY_VIT, "backbone": "convvit", "conv_channels": [8, 16]}})
    from raymim.models import build_encoder

    enc_state = build_encoder(conv.model).state_dict()
    cnet, _ = build_segmentation_network(conv.model, 3, (32, 32, 32), enc_state, feature_size=8, norm_name="batch")
    assert load_encoder(cnet, enc_state, conv.model, (32, 32, 32))["missing_encoder"] == []
    cnet.eval()
    with torch.no_grad():
        assert cnet(torch.rand(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


@pytest.mark.slow
def test_ray_train_grid(ray_session, phantoms, vit_ckpt, mlflow_uri, tmp_path):
    """One real TorchTrainer job: a pretrained/scratch pair split over two workers."""
    cfg = config_from_dict({"finetune": {**FT, "fractions": [1.0], "num_workers": 2, "cpus_per_worker": 0.5}})
    res = run_finetune(str(vit_ckpt), str(phantoms), cfg, tmp_path / "ft", quick=True, engine="ray")
    assert sorted(r["init"] for r in res.rows) == ["pretrained", "scratch"]
    assert len(res.child_run_ids) == 2 and res.parent_run_id
