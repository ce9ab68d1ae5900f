from __future__ import annotations

import torch

from raymim.train.panels import render_panel


def test_panel_png_has_one_row_per_level(tmp_path):
    vis = {f"level{i}/{k}": torch.rand(2, 1, 16, 16, 16) for i in (1, 2) for k in ("input", "masked", "recon")}
    path = render_panel(vis, tmp_path / "p.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
