"""Checkpoints of tiny encoders in raymim's layouts, for the export tests."""

from __future__ import annotations

import pytest
from export_fixtures import CONVVIT, VIT, tiny_convvit, tiny_swin, tiny_vit

from raymim.config import config_from_dict
from raymim.train.checkpoint import write_checkpoint


@pytest.fixture
def vit_checkpoint(tmp_path):
    enc = tiny_vit()
    cfg = config_from_dict({"model": VIT, "finetune": {"norm_name": "batch"}})
    path = write_checkpoint(tmp_path / "vit_ckpt", state={}, encoder_state=enc.state_dict(), cfg=cfg, meta={})
    return path, enc


@pytest.fixture
def swin_checkpoint(tmp_path):
    enc = tiny_swin()
    cfg = config_from_dict({"model": {"backbone": "swin", "img_size": 32, "swin_feature_size": 12,
                                      "swin_window_size": 4, "swin_depths": [1, 1, 1, 1],
                                      "swin_heads": [3, 3, 3, 3]}, "finetune": {"norm_name": "batch"}})
    path = write_checkpoint(tmp_path / "swin_ckpt", state={}, encoder_state=enc.state_dict(), cfg=cfg, meta={})
    return path, enc


@pytest.fixture
def convvit_checkpoint(tmp_path):
    enc = tiny_convvit()
    cfg = config_from_dict({"model": CONVVIT, "finetune": {"norm_name": "batch"}})
    path = write_checkpoint(tmp_path / "convvit_ckpt", state={}, encoder_state=enc.state_dict(), cfg=cfg, meta={})
    return path, enc
