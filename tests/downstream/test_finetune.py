"""Tiny end-to-end fine-tuning on phantoms: pretrained/scratch pairs, MLflow parent/child runs, artifacts."""

from __future__ import annotations

import warnings

import mlflow
import pytest
import torch
from downstream_fixtures import FT, TINY_VIT

from raymim.cli import main
from raymim.config import config_from_dict
from raymim.downstream.evaluate import quick_finetune, run_finetune
from raymim.downstream.loop import finetune_budget, layer_decay_groups, train_cell, train_transforms
from raymim.downstream.networks import build_segmentation_network, freeze_encoder
from raymim.weights import EncoderKeyError, load_encoder, load_pretrained


def test_cli_finetune_pairs_logged(phantoms, vit_ckpt, mlflow_uri, tmp_path, capsys):
    out = tmp_path / "ft"
    sets = [f"finetune.{k}={v}" for k, v in FT.items()]
    argv = ["finetune", "--pretrained", str(vit_ckpt), "--data", str(phantoms), "--fractions", "0.5,1.0",
            "--seeds", "1", "--steps", "2", "--engine", "local", "--out", str(out)]
    for s in sets:
        argv += ["--set", s.replace("'", "")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    # The console: the results table and where things went, each line once, and no third-party
    # warning a user would see (DeprecationWarnings of libraries are hidden outside __main__).
    shown = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert not shown, [f"{w.filename}:{w.lineno}: {w.message}" for w in shown]
    console = capsys.readouterr()
    lines = [ln for ln in (console.out + console.err).splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("[raymim]")]
    assert len(ours) == len(set(ours)), ours
    assert len(lines) < 40, lines
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
    assert all("test/dice/mean" in c.data.metrics and "val/dice/liver" in c.data.metrics for c in children)
    assert "finetune/f1.00/pretrained/dice_gain_vs_scratch" in parent.data.metrics
    assert "finetune/f0.50/scratch/dice" in parent.data.metrics and "finetune/f0.50/scratch/dice_std" in \
        parent.data.metrics
    assert not [k for k in parent.data.metrics if "." in k.split("/")[-1]], "dotted names MLflow cannot group"
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.params["steps"] == "2" for c in children)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "dice_vs_fraction.png", "overlays"} <= arts
    md = (out / "results.md").read_text()
    assert "| 0.5 | pretrained | 2 |" in md and "scratch" in md


def test_quick_finetune_scores_validation_only_unless_asked(phantoms, vit_ckpt):
    state, pcfg = load_pretrained(vit_ckpt)
    cfg = config_from_dict({"model": TINY_VIT, "finetune": {**FT, "fractions": [1.0]}})
    m = quick_finetune(state, cfg, str(phantoms), steps=2, with_scratch=True)
    for key in ("val/dice/mean", "val/nsd/mean", "val/hd95/mean", "val/ppv/mean", "val/sensitivity/mean",
                "val/dice/liver", "scratch/val/dice/mean", "val_dice_gain_vs_scratch"):
        assert key in m, key
    assert not [k for k in m if k.startswith(("test/", "dice/", "scratch/test/"))], "test cases were scored"
    assert 0.0 <= m["val/dice/mean"] <= 1.0
    t = quick_finetune(state, cfg, str(phantoms), steps=2, score_test=True)
    assert "test/dice/mean" in t and t["val/dice/mean"] == pytest.approx(m["val/dice/mean"])
    no_val = config_from_dict({"model": TINY_VIT, "finetune": {**FT, "fractions": [1.0], "val_fraction": 0.0}})
    with pytest.raises(ValueError, match="no validation cases"):
        quick_finetune(state, no_val, str(phantoms), steps=2)


def test_budget_scales_with_training_cases_up_to_a_cap():
    cfg = config_from_dict({"finetune": {"steps_per_case": 30, "min_steps": 50, "max_steps": 400}})
    assert [finetune_budget(n, cfg) for n in (1, 5, 10, 100)] == [50, 150, 300, 400]
    assert finetune_budget(100, config_from_dict({"finetune": {"steps": 7}})) == 7  # a fixed budget wins
    assert finetune_budget(3, cfg, steps=9) == 9


def test_cell_keeps_the_best_validation_weights(phantoms, vit_ckpt):
    """Validation every N steps; the returned model is the best-scoring one, and only it is tested."""
    from raymim.downstream.data import load_labelled_cases
    from raymim.downstream.evaluate import split_cases

    state, _ = load_pretrained(vit_ckpt)
    cfg = config_from_dict({"model": TINY_VIT, "finetune": {**FT, "steps": 6, "val_every": 2, "lr": 3e-3}})
    cases, fixed = load_labelled_cases(str(phantoms), cfg.prepare, cfg.finetune.classes, (32, 32, 32))
    split = split_cases(cases, fixed, cfg)
    by_id = {c["id"]: c for c in cases}
    cell = {"fraction": 1.0, "seed": 0, "init": "pretrained", "train_ids": split.train}
    res = train_cell(cell, by_id, state, cfg, 4, None, split.val, split.test)
    assert [s for s, _ in res["val_curve"]] == [2, 4, 6] and res["steps"] == 6
    best_step, best = max(res["val_curve"], key=lambda t: t[1])
    assert res["best_step"] == best_step and res["val"]["dice/mean"] == pytest.approx(best)
    assert res["test"]["num_cases"] == len(split.test)
    last = train_cell(cell, by_id, state, config_from_dict({"model": TINY_VIT, "finetune": {
        **FT, "steps": 6, "select": "last"}}), 4, None, split.val, split.test)
    assert last["best_step"] == 6 and last["val_curve"] == []


def test_train_transforms_keep_image_and_label_aligned():
    """Flips / rotations move image and label together; intensity changes touch the image only."""
    label = torch.zeros(1, 24, 24, 24, dtype=torch.uint8)
    label[0, 3:11, 5:9, 2:20] = 1  # an asymmetric box, so any unpaired flip or rotation shows
    image = label.float() * 0.5 + 0.25
    crops = set()
    for seed in range(12):
        out = train_transforms((16, 16, 16), seed, augment=True)({"image": image, "label": label})[0]
        img, lab = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        if lab.any() and (lab == 0).any():
            assert img[lab > 0].min() > img[lab == 0].max(), f"seed {seed}: image and label moved apart"
        crops.add(tuple(lab.flatten().tolist()))
    assert len(crops) > 3


def test_training_crops_follow_the_pos_neg_ratio(tmp_path):
    """On a labelled phantom (one organ as the class), the share of training crops centred on a
    label voxel follows ``finetune.pos_fraction`` (MONAI RandCropByPosNegLabeld; a few negatives
    near the border are shifted inside the volume onto the organ, hence the tolerance)."""
    from raymim.config import FinetuneConfig, PrepareConfig
    from raymim.data.synth import generate_phantoms
    from raymim.downstream.data import load_labelled_cases

    assert FinetuneConfig().pos_fraction == 0.5  # MONAI's BTCV recipe, pos = neg = 1
    with pytest.raises(ValueError, match="finetune.pos_fraction"):
        FinetuneConfig(pos_fraction=1.5)
    manifest = generate_phantoms(tmp_path / "phantoms", cases=1, size=48, seed=0)
    (case,), _ = load_labelled_cases(str(manifest), PrepareConfig(), [5], (8, 8, 8))
    assert 0.02 < float((case["label"] > 0).float().mean()) < 0.1  # a small organ: uniform crops would rarely hit it
    shares = {}
    for p in (0.25, 0.75):
        transform = train_transforms((8, 8, 8), 0, augment=False, pos_fraction=p)
        crops = [transform({"image": case["image"], "label": case["label"]})[0]["label"] for _ in range(120)]
        hits = [bool(torch.as_tensor(c)[0, 4, 4, 4]) for c in crops]  # the crop's centre voxel
        shares[p] = sum(hits) / len(hits)
        assert abs(shares[p] - p) < 0.1, shares
    assert shares[0.75] - shares[0.25] > 0.35


def test_layer_decay_groups(vit_ckpt):
    state, pcfg = load_pretrained(vit_ckpt)
    net, prefix = build_segmentation_network(pcfg.model, 4, (32, 32, 32), state, feature_size=8, norm_name="batch")
    groups = layer_decay_groups(net, prefix, lr=1.0, weight_decay=0.1, decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    # 2 blocks: embedding layer 0, blocks 1 and 2, everything else layer 3 at the full LR.
    assert lr_of[id(named["vit.patch_embedding.patch_embeddings.weight"])] == pytest.approx(0.125)
    assert lr_of[id(named["vit.blocks.0.attn.qkv.weight"])] == pytest.approx(0.25)
    assert lr_of[id(named["vit.blocks.1.attn.qkv.weight"])] == pytest.approx(0.5)
    assert lr_of[id(named["out.conv.conv.weight"])] == pytest.approx(1.0)
    assert sum(len(g["params"]) for g in groups) == len(named)
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(named["vit.blocks.0.attn.qkv.weight"])] == 0.1 and wd[id(named["vit.norm.bias"])] == 0.0


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


def test_default_output_folder_is_named_after_the_pretraining_run(tmp_path):
    from raymim.downstream.commands import pretrain_run_name

    ckpt = tmp_path / "mim-try1" / "checkpoint_step00000060"
    ckpt.mkdir(parents=True)
    (ckpt / "encoder.pt").write_bytes(b"")
    assert pretrain_run_name(str(ckpt)) == "mim-try1"
    assert pretrain_run_name(str(ckpt / "encoder.pt")) == "mim-try1"
    (tmp_path / "mim-try1" / "best").mkdir()
    assert pretrain_run_name(str(tmp_path / "mim-try1" / "best")) == "mim-try1"
