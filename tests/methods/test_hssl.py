"""HSSL: the domain head learns the phantom sites above chance; simclr has no domain head."""

from __future__ import annotations

import pytest
import torch

from raymim.methods import build_method

from .conftest import tiny_config
from .phantoms import phantom_batch


@pytest.mark.slow
def test_domain_head_learns_sites():
    """Sites differ in noise, contrast and field of view (how much of it the body fills)."""
    torch.manual_seed(0)
    img, _, _ = phantom_batch(18, seed=1)
    sites = [f"site{i % 3}" for i in range(18)]
    method = build_method("hssl", tiny_config("hssl", contrast_weight=0.1, rec_weight=0.1))
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


def test_simclr_is_contrastive_only(volume: torch.Tensor):
    method = build_method("simclr", tiny_config("simclr"))
    out = method({"image": volume.repeat(2, 1, 1, 1, 1), "domain": ["a", "b"]})
    assert method.domain_head is None and "loss_domain" not in out.metrics and out.metrics["loss_contrast"] > 0
