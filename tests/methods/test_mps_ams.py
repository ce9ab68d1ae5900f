"""mps_ams: AMS ratio in the metrics, prior / online selection on phantoms, MiM levels."""

from __future__ import annotations

import pytest
import torch

from raymim.config import ModelConfig
from raymim.masking.selection import lesion_token_mask
from raymim.methods import MPSAMSConfig, build_method

from .conftest import tiny_config
from .phantoms import lesion_masking_factor, phantom_batch


def test_schedule_drives_the_mask_ratio(volume: torch.Tensor):
    cfg = tiny_config("mps_ams", levels=1, mask_schedule="linear", mask_ratio_start=0.5, mask_ratio_end=0.875,
                      mps_mode="none")
    method = build_method("mps_ams", cfg)
    seen = []
    for step in (0, 5, 10):
        method.set_progress(step, 10)
        out = method({"image": volume})
        seen.append((out.metrics["mask_ratio_target"], out.metrics["mask_ratio"]))
    assert seen[0] == (0.5, 0.5) and seen[-1] == (0.875, 0.875)
    assert seen[0][0] < seen[1][0] < seen[2][0]


def test_the_default_ratio_grows_over_training(volume: torch.Tensor):
    """MPSAMSConfig's AMS default: linear from 0.5 to mask_ratio (MPS-AMS is not MPS alone)."""
    cfg = tiny_config("mps_ams", levels=1)
    assert cfg.method.mask_schedule == MPSAMSConfig().mask_schedule == "linear"
    method = build_method("mps_ams", cfg)
    seen = []
    for step in (0, 10):
        method.set_progress(step, 10)
        seen.append(float(method({"image": volume}).metrics["mask_ratio_target"]))
    assert seen == [0.5, cfg.method.mask_ratio]


def test_online_covariance_clustering_masks_lesion_patches_first():
    """Online MPS on an untrained encoder's patch embeddings (24 held-out 64^3 phantoms): the
    patch similarity matrix clustered per volume masks lesion patches >= 3x as often as random."""
    torch.manual_seed(0)
    img, lab, _ = phantom_batch(24, size=64, seed=2)
    cfg = tiny_config("mps_ams", levels=1, mps_mode="online", mps_clusters=4)
    cfg.model = ModelConfig(img_size=64, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4,
                            decoder_hidden_size=48, decoder_layers=1, decoder_heads=4)
    factor = _online_factor(build_method("mps_ams", cfg), img, lesion_token_mask(lab, 8))
    print(f"online MPS lesion masking factor at ratio 0.1, untrained: {factor:.2f}x (random: 1.0x)")
    assert factor >= 3.0


def _online_factor(method, img: torch.Tensor, lesion: torch.Tensor, ratio: float = 0.1) -> float:
    with torch.no_grad():
        scores = method.online_scores(img)
        torch.manual_seed(1)
        return lesion_masking_factor(method.mask_from(scores, len(img), img.device, ratio).mask, lesion, ratio)


@pytest.mark.slow
def test_online_selection_masks_lesion_patches_first():
    """Online MPS (similarity-matrix k-means, patch embeddings), 48 held-out 64^3 phantoms, after 60 steps."""
    torch.manual_seed(0)
    train, _, _ = phantom_batch(24, size=64, seed=0)
    held = [phantom_batch(24, size=64, seed=s) for s in (1, 2)]
    cfg = tiny_config("mps_ams", levels=1, mask_ratio=0.6, mps_mode="online", mps_clusters=4)
    cfg.model = ModelConfig(img_size=64, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4,
                            decoder_hidden_size=48, decoder_layers=1, decoder_heads=4)
    method = build_method("mps_ams", cfg)
    before = [_online_factor(method, img, lesion_token_mask(lab, 8)) for img, lab, _ in held]
    opt = torch.optim.AdamW(method.parameters(), lr=2e-3)
    for step in range(60):
        method.set_progress(step, 60)
        out = method({"image": train[torch.randperm(24)[:4]]})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = [_online_factor(method, img, lesion_token_mask(lab, 8)) for img, lab, _ in held]
    print(f"online MPS lesion masking factor at ratio 0.1 (two held-out sets of 24): untrained "
          f"{before[0]:.2f}x / {before[1]:.2f}x, after 60 steps {after[0]:.2f}x / {after[1]:.2f}x")
    # Issue target 3x with margin: measured 3.59x / 5.00x (untrained 3.01x / 3.73x); 3.3-4.6x after
    # 60 steps on 24 held-out phantoms of seeds 0, 1, 2, 5 (bench/RESULTS.md "MPS lesion masking").
    assert min(after) >= 3.0


def test_prior_column_and_mim_levels(volume: torch.Tensor):
    batch = {"image": volume.repeat(2, 1, 1, 1, 1)}
    prob = torch.zeros(2, 8**3)  # a stored 8^3 grid, resampled to the model's 4^3 grid
    prob[:, :3] = 1.0
    method = build_method("mps_ams", tiny_config("mps_ams", levels=1, mask_ratio=0.25, mps_mode="prior"))
    out = method({**batch, "lesion_prob": prob})
    assert out.metrics["mps_prior_missing"] == 0.0 and out.metrics["mps_masked_lesion_share"] > 0
    assert method(batch).metrics["mps_prior_missing"] == 1.0  # no column: falls back to online
    mim = build_method("mps_ams", tiny_config("mps_ams", mask_ratio=0.6, mps_mode="online"))  # 2 levels
    out = mim(batch)
    assert "loss_align" in out.metrics and "l2/recon" in out.visuals
