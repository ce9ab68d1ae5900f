"""MiM specifics: L=1 reduces to MAE, per-level metrics and visuals, alignment loss behaviour."""

from __future__ import annotations

import torch

from raymim.masking.multilevel import mim_levels
from raymim.methods import MAE, MiM, build_method
from raymim.methods.losses import cross_level_infonce, masked_recon_loss
from raymim.methods.mim import MiMConfig, level1_side_choices, region_keys

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
    rec = sum(out.metrics[f"loss_rec_l{i}"] for i in (1, 2, 3))  # reference: levels summed, weight 1
    align = out.metrics["loss_align_l2"] + out.metrics["loss_align_l3"]
    assert abs(out.metrics["loss_rec"] - rec) < 1e-5 and abs(out.metrics["loss_align"] - align) < 1e-5
    assert abs(out.metrics["loss"] - (rec + 0.1 * align)) < 1e-4
    assert out.metrics["volumes_per_sample"] == 7.0  # 1 + gamma + gamma^2 (gamma per parent volume)
    assert {f"l{i}/{k}" for i in (1, 2, 3) for k in ("input", "masked", "recon")} <= set(out.visuals)


def test_alignment_lower_for_aligned_than_shuffled():
    torch.manual_seed(0)
    tokens = torch.randn(16, 27, 32)  # parent token features
    positive = torch.randint(0, 27, (16,))
    context = tokens[torch.arange(16), positive] + 0.1 * torch.randn(16, 32)  # query near its region key
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


def _nested(levels) -> bool:
    """Every box of level l + 1 lies inside the box of its parent volume at level l."""
    for parent, child in zip(levels, levels[1:]):
        outer = parent.boxes[torch.arange(child.boxes.shape[0])[:, None], child.parent]  # [B, n, 6]
        inside = (child.boxes[..., :3] >= outer[..., :3]).all() & (child.boxes[..., 3:] <= outer[..., 3:]).all()
        if not bool(inside):
            return False
    return True


def test_level1_scale_varies_within_its_range_and_levels_nest(volume: torch.Tensor):
    """The default 192 / 96 / 16 hierarchy at random level-1 scales: level-1 sides cover the
    range (volume fraction 0.2..1 of 192^3: sides 112..192), deeper levels keep their ratios,
    and every child box lies inside its parent's box, each level resized to the input."""
    mc = MiMConfig()
    choices = level1_side_choices(192, mc.level_sizes, 3, 96 // 16, mc.mask_ratio, 1, mc.level1_scale)
    firsts = [c[0] for c in choices]
    assert min(firsts) >= 0.2 ** (1 / 3) * 192 - 1e-6 and max(firsts) == 192 and len(choices) >= 8
    assert all(abs(c[1] - c[0] / 2) <= 0.5 and abs(c[2] - c[0] / 12) <= 1 for c in choices)
    image = torch.rand(1, 1, 192, 192, 192)
    for sides in (choices[0], choices[len(choices) // 2]):
        g = torch.Generator().manual_seed(sides[0])
        levels = mim_levels(image, 96, 16, sides, 0.6, 4, generator=g)
        assert [{int(b[3] - b[0]) for b in lv.boxes.reshape(-1, 6)} for lv in levels] == [{s} for s in sides]
        assert all(lv.volumes.shape[2:] == (96, 96, 96) for lv in levels) and _nested(levels)

    # the method draws a scale per step, in range, and its levels nest
    torch.manual_seed(0)
    method = build_method("mim", tiny_config("mim", levels=2, level_sizes=[32, 8], gamma=2, mask_ratio=0.6))
    batch = {"image": volume.repeat(2, 1, 1, 1, 1)}
    seen = set()
    for _ in range(20):
        levels = method.training_levels(batch)
        sides = [lv.side for lv in levels]
        seen.add(sides[0])
        assert 0.2 ** (1 / 3) * 32 - 1e-6 <= sides[0] <= 32 and abs(sides[1] - sides[0] / 4) <= 0.5
        assert all(lv.volumes.shape[2:] == (32, 32, 32) for lv in levels) and _nested(levels)
    assert len(seen) >= 5
    fixed = build_method("mim", tiny_config("mim", levels=2, level_sizes=[32, 8], gamma=2, level1_scale=[1.0, 1.0]))
    assert {fixed.training_levels(batch)[0].side for _ in range(5)} == {32}
    out = method(batch)
    assert torch.isfinite(out.loss) and "loss_align_l2" in out.metrics


def test_alignment_keys_are_detached_and_the_positive_is_the_parent_region(volume: torch.Tensor):
    """L_C sends no gradient into the parent's features (keys detached) but trains the child branch
    and both heads; its positive is the cube the child was cut from, so moving the child's query
    onto that region's pooled key lowers the loss, and onto another region's key raises it."""
    torch.manual_seed(0)
    method = build_method("mim", tiny_config("mim", levels=2, level_sizes=[32, 16], gamma=2, mask_ratio=0.6,
                                             level1_scale=[1.0, 1.0]))
    levels = method.training_levels({"image": volume.repeat(2, 1, 1, 1, 1)})
    parent, child = levels
    grid, dec = method.encoder.grid[0], method.config.model.decoder_hidden_size
    parent_feats = torch.randn(parent.volumes.shape[0], grid**3, dec, requires_grad=True)
    child_feats = torch.randn(child.volumes.shape[0], grid**3, dec, requires_grad=True)
    loss = method.forward_alignment(0, child, child_feats, parent, parent_feats)
    loss.backward()
    assert parent_feats.grad is None  # detached: nothing reaches the parent branch through the keys
    assert child_feats.grad is not None and child_feats.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.key_heads[0].parameters())

    # the positive is the pooled key of the child's region (parent_cube), not a single token
    from raymim.masking.multilevel import parent_cube

    regions = region_keys(parent_feats.detach(), grid, parent.block)  # [B, R, dec]
    assert regions.shape[1] == (grid // parent.block) ** 3
    method.query_heads[0] = method.key_heads[0]  # same map for queries and keys: sim 1 at the positive
    rows = child.parent.flatten() + torch.arange(2).repeat_interleave(child.parent.shape[1]) * parent.boxes.shape[1]
    pos = parent_cube(child.parent_token.flatten(), grid, parent.block)
    on_region = regions[rows, pos].unsqueeze(1).expand(-1, grid**3, -1)  # mean over tokens = that key
    other = regions[rows, (pos + 1) % regions.shape[1]].unsqueeze(1).expand(-1, grid**3, -1)
    with torch.no_grad():
        good = method.forward_alignment(0, child, on_region, parent, parent_feats)
        bad = method.forward_alignment(0, child, other, parent, parent_feats)
    assert good < bad
