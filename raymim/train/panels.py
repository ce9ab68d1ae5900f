"""Reconstruction panels: three orthogonal middle slices of each visual, one row per level.

A method's visuals are ``[C, X, Y, Z]`` tensors (RAS: ``z``, the last axis, runs inferior ->
superior) keyed ``"<row>/<kind>"`` (``"l2/recon"``) or plain ``"<kind>"``. Kinds ``input``,
``masked`` and ``recon`` are drawn (in that order, then any other kind); ``mask`` (the voxel
mask, 1 = removed and predicted) is not drawn on its own but tinted over the ``masked`` image.
Tensors may be MONAI ``MetaTensor`` s whose ``meta`` holds ``"label"`` (what the row shows, e.g.
``"level 2: 16^3 crop, resized to 32^3"``) and ``"case_id"`` (the sample's case, for the title).

Layout: one row per row key; columns grouped by view (axial, coronal, sagittal through the middle
of the volume), within a view ``input | masked | recon``; one intensity window for every image
of the figure (``window``, default the range of the input slices drawn) with a
colour bar.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

# (view name, fixed axis of [X, Y, Z], the axis' letter)
VIEWS = (("axial", 2, "z"), ("coronal", 1, "y"), ("sagittal", 0, "x"))
KIND_ORDER = ("input", "masked", "recon")
MASK_KIND = "mask"
MASK_COLOR = "tab:orange"
MASK_ALPHA = 0.45


def orthogonal_slices(t: torch.Tensor) -> dict[str, tuple[np.ndarray, int]]:
    """``[B, C, X, Y, Z]`` / ``[C, X, Y, Z]`` / ``[X, Y, Z]`` -> ``{view: (slice, index)}`` for the
    first sample and channel: axial ``[Y, X]``, coronal ``[Z, X]``, sagittal ``[Z, Y]`` (rows run
    up with ``origin="lower"``), each through the middle of its fixed axis. Only the three slices
    are copied to the host."""
    t = t.detach()
    while t.ndim > 3:
        t = t[0]
    out = {}
    for view, axis, _ in VIEWS:
        index = t.shape[axis] // 2
        sl = t.select(axis, index)  # the two remaining axes in order: [Y, Z] / [X, Z] / [X, Y]
        out[view] = (torch.as_tensor(sl).float().cpu().numpy().T, index)
    return out


def _meta(t: Any) -> Mapping[str, Any]:
    meta = getattr(t, "meta", None)
    return meta if isinstance(meta, Mapping) else {}


def _row_order(name: str) -> tuple:
    """Named rows first in natural order (``l2`` before ``l10``), the plain row last."""
    return (name == "", [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def collect_rows(visuals: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Visual tensors (``ndim >= 3``) grouped by row; a row holding the very tensors of another
    (MiM's plain ``input`` / ``masked`` / ``recon`` repeat level 1) is kept once, under its name."""
    rows: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in visuals.items():
        if torch.is_tensor(value) and value.ndim >= 3:
            row, _, kind = key.rpartition("/")
            rows.setdefault(row, {})[kind] = value
    out: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[frozenset] = set()
    for row in sorted(rows, key=_row_order):
        signature = frozenset((kind, id(t)) for kind, t in rows[row].items())
        if signature not in seen:
            seen.add(signature)
            out[row] = rows[row]
    return out


def _row_label(row: str, cols: Mapping[str, torch.Tensor], labels: Mapping[str, str] | None) -> str:
    if labels and row in labels:
        return labels[row]
    for t in cols.values():
        if _meta(t).get("label"):
            return str(_meta(t)["label"])
    shape = next(iter(cols.values())).shape[-3:]
    return f"{row + ': ' if row else ''}{'x'.join(str(int(s)) for s in shape)} network input"


def _case_id(rows: Mapping[str, Mapping[str, torch.Tensor]]) -> str | None:
    for cols in rows.values():
        for t in cols.values():
            if _meta(t).get("case_id"):
                return str(_meta(t)["case_id"])
    return None


def _window(slices: list[np.ndarray]) -> tuple[float, float]:
    pooled = np.concatenate([s.ravel() for s in slices])
    pooled = pooled[np.isfinite(pooled)]
    if not pooled.size:
        return 0.0, 1.0
    lo, hi = float(pooled.min()), float(pooled.max())
    if hi <= lo:
        lo, hi = lo - 0.5, lo + 0.5
    return lo, hi


def panel_figure(visuals: Mapping[str, Any], title: str = "", case_id: str | None = None,
                 labels: Mapping[str, str] | None = None, window: tuple[float, float] | None = None):
    """The panel as a matplotlib ``Figure`` (see the module docstring); ``case_id`` and ``labels``
    (row -> label) override what the tensors' ``meta`` says. The caller closes the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = collect_rows(visuals)
    if not rows:
        raise ValueError(f"no 3D visuals to draw among keys {sorted(visuals)}")
    present = {k for cols in rows.values() for k in cols if k != MASK_KIND}
    kinds = [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))
    if not kinds:
        raise ValueError(f"only masks among the visuals {sorted(visuals)}; nothing to draw them over")
    slices = {(row, kind): orthogonal_slices(t) for row, cols in rows.items() for kind, t in cols.items()}
    if window is None:
        inputs = [s for (_, kind), views in slices.items() if kind == "input" for s, _ in views.values()]
        window = _window(inputs or [s for views in slices.values() for s, _ in views.values()])
    vmin, vmax = float(window[0]), float(window[1])

    nk, nrows = len(kinds), len(rows)
    fig = plt.figure(figsize=(1.55 * 3 * nk + 2.6, 1.6 * nrows + 1.3), layout="constrained")
    outer = fig.add_gridspec(1, 4, width_ratios=[nk, nk, nk, 0.12], wspace=0.04)
    tint = ListedColormap([MASK_COLOR])
    image = None
    shapes = {tuple(next(iter(cols.values())).shape[-3:]) for cols in rows.values()}
    for v, (view, _, letter) in enumerate(VIEWS):
        grid = outer[0, v].subgridspec(nrows, nk, wspace=0.03, hspace=0.05)
        for i, (row, cols) in enumerate(rows.items()):
            for j, kind in enumerate(kinds):
                ax = fig.add_subplot(grid[i, j])
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if i == 0 or len(shapes) > 1:
                    index = slices[row, next(iter(cols))][view][1]
                    ax.set_title(f"{view} {letter}={index}\n{kind}" if i == 0 else f"{letter}={index}", fontsize=7)
                if v == 0 and j == 0:
                    ax.set_ylabel(textwrap.fill(_row_label(row, cols, labels), 24), fontsize=7)
                if kind not in cols:
                    continue
                data, _ = slices[row, kind][view]
                image = ax.imshow(data, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
                image.set_gid(f"{row}/{kind}/{view}")
                if kind == "masked" and MASK_KIND in cols:
                    m, _ = slices[row, MASK_KIND][view]
                    over = ax.imshow(np.ma.masked_where(m < 0.5, m), cmap=tint, alpha=MASK_ALPHA, origin="lower",
                                     interpolation="nearest")
                    over.set_gid(f"{row}/{MASK_KIND}/{view}")
    bar = fig.colorbar(image, cax=fig.add_subplot(outer[0, 3]))
    bar.set_label(f"intensity (window {vmin:.3g} .. {vmax:.3g})", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    if any(MASK_KIND in cols for cols in rows.values()):
        fig.legend(handles=[Patch(color=MASK_COLOR, alpha=MASK_ALPHA, label="masked (predicted) region")],
                   loc="outside lower center", fontsize=7, frameon=False)
    case_id = case_id or _case_id(rows)
    head = [title] if title else []
    if case_id:
        head.append(f"case {case_id}")
    if len(shapes) == 1:
        shape = next(iter(shapes))
        head.append("middle slices " + " ".join(f"{c}={s // 2}" for c, s in zip("xyz", shape, strict=True))
                    + f" of {'x'.join(str(int(s)) for s in shape)}")
    fig.suptitle(" | ".join(head), fontsize=9)
    return fig


def render_panel(visuals: Mapping[str, Any], path: str | Path, title: str = "", case_id: str | None = None,
                 labels: Mapping[str, str] | None = None, window: tuple[float, float] | None = None) -> Path:
    """Draw :func:`panel_figure` to the PNG ``path``. Keys like ``"l1/input"`` become row ``l1``,
    column ``input``; plain keys one row; non-tensor entries are ignored."""
    import matplotlib.pyplot as plt

    fig = panel_figure(visuals, title, case_id, labels, window)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
