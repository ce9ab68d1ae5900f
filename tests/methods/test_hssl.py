"""HSSL: no reconstruction term by default, the domain head learns the phantom sites above chance;
simclr is plain SimCLR (no decoder, no domain head, no reconstruction) whose NT-Xent falls."""

from __future__ import annotations

import pytest
import torch

from raymim.config import ConfigError
from raymim.methods import build_method

from .conftest import tiny_config
from .phantoms import phantom_batch


@pytest.mark.slow
def test_domain_head_learns_sites():
    """Sites differ in noise, contrast and field of view (how much of it the body fills)."""
    torch.manual_seed(0)
    img, _, _ = phantom_batch(18, seed=1)
    sites = [f"site{i % 3}" for i in range(18)]
    method = build_method("hssl", tiny_config("hssl", contrast_weight=0.1))  # default: no reconstruction
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    train, test = slice(0, 12), slice(12, 18)
    for _ in range(60):
        idx = torch.randperm(12)[:6]
        out = method({"image": img[train][idx], "domain": [sites[i] for i in idx.tolist()]})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    pred = method.predict_domain(img[test])
    acc = sum(p == t for p, t in zip(pred, sites[12:])) / 6
    print(f"HSSL domain accuracy on held-out phantoms: {acc:.2f} (chance 0.33)")
    assert acc > 0.5
    assert sorted(method.state_dict()["_extra_state"]["domain_names"]) == ["site0", "site1", "site2"]


def test_hssl_has_no_reconstruction_term_by_default(volume: torch.Tensor):
    cfg = tiny_config("hssl")
    assert cfg.method.rec_weight == 0.0
    method = build_method("hssl", cfg)
    out = method({"image": volume.repeat(2, 1, 1, 1, 1), "domain": ["a", "b"]})
    assert "loss_rec" not in out.metrics and float(out.metrics["mask_ratio"]) == 0.0
    assert {"view1", "view2"} <= set(out.visuals) and "recon" not in out.visuals
    mc = cfg.method
    total = mc.contrast_weight * out.metrics["loss_contrast"] + mc.domain_weight * out.metrics["loss_domain"]
    assert torch.allclose(out.loss.detach(), total)
    out.loss.backward()
    assert method.decoder.pred.weight.grad is None  # the decoder's pixel head takes no part in the loss
    with_rec = build_method("hssl", tiny_config("hssl", rec_weight=1.0))({"image": volume.repeat(2, 1, 1, 1, 1)})
    assert "loss_rec" in with_rec.metrics and "recon" in with_rec.visuals  # the opt-in MAE term


def test_simclr_is_plain_simclr(volume: torch.Tensor):
    with pytest.raises(ConfigError, match="method.rec_weight is not a field of method 'simclr'"):
        tiny_config("simclr", rec_weight=1.0)  # SimCLR has no reconstruction term to weigh
    method = build_method("simclr", tiny_config("simclr"))
    out = method({"image": volume.repeat(2, 1, 1, 1, 1), "domain": ["a", "b"]})
    assert method.domain_head is None and method.decoder is None
    assert "loss_domain" not in out.metrics and "loss_rec" not in out.metrics
    assert out.loss.item() == out.metrics["loss_contrast"].item() > 0


def test_simclr_nt_xent_falls_on_phantoms():
    """NT-Xent on the same augmented views (fixed seeds) before and after 60 steps on 4 phantoms."""
    torch.manual_seed(0)
    img, _, _ = phantom_batch(4, seed=3)
    method = build_method("simclr", tiny_config("simclr"))

    def fixed_views_loss() -> float:
        with torch.no_grad():
            return sum(torch.manual_seed(100 + s) and method({"image": img}).loss.item() for s in range(3)) / 3

    before = fixed_views_loss()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    for _ in range(60):
        out = method({"image": img})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = fixed_views_loss()
    print(f"SimCLR NT-Xent on 4 phantoms, fixed views: {before:.3f} -> {after:.3f}")
    assert after < 0.8 * before
