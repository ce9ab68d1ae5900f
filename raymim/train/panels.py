"""Reconstruction panels: the middle axial slice of each visual tensor, one row per level."""

from __future__ import annotations

from pathlib import Path

import torch


def _middle_slice(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, X, Y, Z]`` / ``[C, X, Y, Z]`` / ``[X, Y, Z]`` -> the first sample's middle axial slice."""
    t = t.detach().float().cpu()
    while t.ndim > 3:
        t = t[0]
    return t[:, :, t.shape[2] // 2].T  # RAS: z is the last axis; transpose so y runs vertically


def render_panel(visuals: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Keys like ``"level1/input"`` become row ``level1``, column ``input``; plain keys one row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(visuals):
        row, _, col = key.rpartition("/")
        if torch.is_tensor(visuals[key]) and visuals[key].ndim >= 3:
            rows.setdefault(row, {})[col] = visuals[key]
    if not rows:
        raise ValueError(f"no 3D visuals to draw among keys {sorted(visuals)}")
    ncols = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 2.2 * len(rows)), squeeze=False)
    for i, (row, cols) in enumerate(rows.items()):
        for j in range(ncols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(cols):
                col = list(cols)[j]
                ax.imshow(_middle_slice(cols[col]).numpy(), cmap="gray", origin="lower")
                ax.set_title(f"{row} {col}".strip(), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
