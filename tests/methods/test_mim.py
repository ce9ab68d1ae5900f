"""MiM specifics: L=1 reduces to MAE, per-level metrics and visuals, alignment loss behaviour."""

from __future__ import annotations

import torch

from raymim.methods import MAE, MiM, build_method
from raymim.methods.losses import cross_level_infonce, masked_recon_loss

from .conftest import tiny_config


def test_single_level_mim_is_mae(volume: torch.Tensor):
    batch = {"image": volume.repeat(2, 1, 1, 1, 1)}
    torch.manual_seed(0)
    mim = build_method("mim", tiny_config("mim", levels=1, level_sizes=[384]))
    mae = build_method("mae", tiny_config("mae"))
    assert isinstance(mim, MiM) and isinstance(mae, MAE)
    missing = mae.load_state_dict(mim.state_dict(), strict=False)
    assert not missing.missing_keys  # MiM = MAE + projection heads
    torch.manual_seed(5)
    a = mim(batch)
    torch.manual_seed(5)
    b = mae(batch)
    assert torch.allclose(a.loss, b.loss) and a.metrics["loss_align"] == 0.0


def test_three_levels_metrics_and_visuals(volume: torch.Tensor):
    torch.manual_seed(0)
    method = build_method("mim", tiny_config("mim", levels=3, level_sizes=[32, 16, 8], gamma=2, mask_ratio=0.6))
    out = method({"image": volume.repeat(2, 1, 1, 1, 1)})
    for key in ("loss_rec_l1", "loss_rec_l2", "loss_rec_l3", "loss_align_l2", "loss_align_l3", "loss_align"):
        assert key in out.metrics
    rec = sum(out.metrics[f"loss_rec_l{i}"] for i in (1, 2, 3)) / 3
    assert abs(out.metrics["loss_rec"] - rec) < 1e-5
    assert abs(out.metrics["loss"] - (rec + 0.1 * out.metrics["loss_align"])) < 1e-4
    assert out.metrics["volumes_per_sample"] == 5.0
    assert {f"l{i}/{k}" for i in (1, 2, 3) for k in ("input", "masked", "recon")} <= set(out.visuals)


def test_alignment_lower_for_aligned_than_shuffled():
    torch.manual_seed(0)
    tokens = torch.randn(16, 27, 32)  # parent token features
    positive = torch.randint(0, 27, (16,))
    context = tokens[torch.arange(16), positive] + 0.1 * torch.randn(16, 32)
    aligned = cross_level_infonce(context, tokens, positive, tau=0.2)
    shuffled = cross_level_infonce(context[torch.randperm(16)], tokens, positive, tau=0.2)
    wrong = cross_level_infonce(context, tokens, (positive + 1) % 27, tau=0.2)
    assert aligned < 0.5 < shuffled and aligned < wrong


def test_masked_recon_loss_ignores_visible_patches():
    pred, target = torch.zeros(1, 4, 8), torch.ones(1, 4, 8)
    target[0, :2] = 100.0  # errors on visible patches must not count
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert masked_recon_loss(pred, target, mask).item() == 1.0
    assert masked_recon_loss(pred, target, mask, "l1").item() == 1.0
