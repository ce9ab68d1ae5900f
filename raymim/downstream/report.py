"""Result tables (CSV + Markdown), the Dice-vs-label-fraction plot and orthogonal-slice overlays."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raymim.downstream.metrics import METRICS, aggregate_seeds

INITS = ("pretrained", "scratch")


def cell_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell: fraction, seed, init, n_train, every test metric."""
    rows = []
    for r in sorted(results, key=lambda r: (r["fraction"], r["seed"], r["init"])):
        row = {"fraction": r["fraction"], "seed": r["seed"], "init": r["init"], "n_train": r["n_train"],
               "steps": r["steps"], "loss_last": r["loss_last"], "train_seconds": round(r["train_seconds"], 1)}
        row.update(r["test"])
        rows.append(row)
    return rows


def summary_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (fraction, init), and the pretrained - scratch Dice gap."""
    out = []
    fractions = sorted({r["fraction"] for r in results})
    for f in fractions:
        by_init = {}
        for init in INITS:
            cells = [r for r in results if r["fraction"] == f and r["init"] == init]
            if cells:
                by_init[init] = aggregate_seeds([c["test"] for c in cells])
                by_init[init]["seeds"] = len(cells)
                by_init[init]["n_train"] = cells[0]["n_train"]
        for init, agg in by_init.items():
            row = {"fraction": f, "init": init, "n_train": agg["n_train"], "seeds": agg["seeds"]}
            for m in METRICS:
                row[f"{m}/mean"] = agg.get(f"{m}/mean", math.nan)
                row[f"{m}/mean_std"] = agg.get(f"{m}/mean_std", math.nan)
            if init == "pretrained" and "scratch" in by_init:
                row["dice_gain_vs_scratch"] = agg["dice/mean"] - by_init["scratch"]["dice/mean"]
            out.append(row)
    return out


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_summary(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """Markdown table: fraction, init, n_train, seeds, each metric as mean ± std, Dice gain."""
    head = ["label fraction", "init", "train cases", "seeds", "Dice", "NSD", "HD95 (mm)", "PPV", "sensitivity",
            "Dice gain vs scratch"]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                        "|" + "---|" * len(head)]
    for r in rows:
        cells = [_fmt(r["fraction"]), r["init"], _fmt(r["n_train"]), _fmt(r["seeds"])]
        cells += [f"{_fmt(r[f'{m}/mean'])} ± {_fmt(r[f'{m}/mean_std'])}" for m in METRICS]
        gain = r.get("dice_gain_vs_scratch")
        cells.append(f"{gain:+.4f}" if isinstance(gain, float) and not math.isnan(gain) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_dice_vs_fraction(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "dice/mean") -> Path:
    """Mean Dice (± std over seeds) against the label fraction, pretrained and scratch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    for init, style in zip(INITS, ("o-", "s--")):
        pts = [r for r in rows if r["init"] == init]
        if not pts:
            continue
        x = [r["fraction"] for r in pts]
        y = np.array([r[metric] for r in pts])
        e = np.nan_to_num(np.array([r[f"{metric}_std"] for r in pts]))
        ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=init)
    ax.set_xscale("log")
    xs = sorted({r["fraction"] for r in rows})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("label fraction (of training cases)")
    ax.set_ylabel(metric.replace("/", " "))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def overlay_figure(image: np.ndarray, label: np.ndarray, preds: Mapping[str, np.ndarray], path: str | Path,
                   title: str = "") -> Path:
    """Orthogonal slices through the label's centre of mass: image, ground truth, each prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image)
    lab = np.asarray(label)
    fg = np.argwhere(lab > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(img.shape) // 2
    columns = [("ground truth", lab)] + list(preds.items())
    fig, axes = plt.subplots(3, len(columns), figsize=(2.6 * len(columns), 7.2), dpi=100, squeeze=False)
    vmax = max(int(lab.max()), *(int(p.max()) for p in preds.values()), 1)
    for row, axis in enumerate(range(3)):
        sl = [slice(None)] * 3
        sl[axis] = int(centre[axis])
        for col, (name, seg) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(np.rot90(img[tuple(sl)]), cmap="gray", vmin=0, vmax=1)
            s = np.rot90(seg[tuple(sl)]).astype(float)
            ax.imshow(np.ma.masked_where(s == 0, s), cmap="tab10", vmin=0, vmax=max(vmax, 9), alpha=0.5,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
