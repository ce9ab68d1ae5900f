"""Result tables (CSV + Markdown), Dice-vs-label-fraction plots and orthogonal-slice overlays.

Classes are named everywhere: per-class metric keys are ``<metric>/<class>`` (the names of
:func:`raymim.downstream.metrics.summarize`); :func:`class_labels` maps them to what tables,
plots and legends show (``finetune.class_names``, else the label values ``finetune.classes``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raymim.downstream.metrics import METRICS, aggregate_seeds

INITS = ("pretrained", "scratch")


def result_classes(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Class names in the per-class test metrics (``dice/<class>``) of ``results``, in order."""
    names: list[str] = []
    for r in results:
        for key in r.get("test", {}):
            metric, _, name = key.partition("/")
            if metric == "dice" and name and name != "mean" and name not in names:
                names.append(name)
    return names


def class_labels(names: Sequence[str], class_names: Sequence[str] | None = None,
                 classes: Sequence[int] | None = None) -> dict[str, str]:
    """What each per-class key name is shown as: ``class_names`` (then the keys already are
    those names), else ``label <value>`` for the label values ``classes`` (class ``i`` is the
    ``i``-th value), else the key itself (``class_1`` ...)."""
    names = list(names)
    if class_names and len(class_names) == len(names):
        return dict(zip(names, (str(n) for n in class_names), strict=True))
    if classes and len(classes) == len(names):
        return {n: f"label {int(v)}" for n, v in zip(names, classes, strict=True)}
    return {n: n for n in names}


def _labels(classes: Mapping[str, str] | Sequence[str] | None, names: Sequence[str]) -> dict[str, str]:
    if classes is None:
        return {n: n for n in names}
    return dict(classes) if isinstance(classes, Mapping) else {n: n for n in classes}


def _row_classes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Class names of the per-class Dice columns (``dice/<class>``) of summary rows."""
    names: list[str] = []
    for r in rows:
        for key in r:
            metric, _, name = key.partition("/")
            if metric == "dice" and name and not name.startswith("mean") and not name.endswith("_std") \
                    and name not in names:
                names.append(name)
    return names


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
    """Mean and std over seeds per (fraction, init) of each metric averaged over classes
    (``<metric>/mean``, ``<metric>/mean_std``) and per class (``<metric>/<class>``,
    ``<metric>/<class>_std``), and the pretrained - scratch Dice gap."""
    out = []
    classes = result_classes(results)
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
            for m in METRICS:
                for c in classes:
                    row[f"{m}/{c}"] = agg.get(f"{m}/{c}", math.nan)
                    row[f"{m}/{c}_std"] = agg.get(f"{m}/{c}_std", math.nan)
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


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def markdown_summary(rows: Sequence[Mapping[str, Any]], title: str = "",
                     classes: Mapping[str, str] | Sequence[str] | None = None) -> str:
    """Markdown: a table of fraction, init, n_train, seeds, each metric (averaged over classes) as
    mean ± std over seeds and the Dice gain; then a table of Dice per class (mean ± std over
    seeds), its columns named by ``classes`` (key name -> shown name; default: the key names)."""
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
    names = _row_classes(rows)
    shown = _labels(classes, names)
    names = [n for n in shown if n in names] + [n for n in names if n not in shown]
    if names:
        head = ["label fraction", "init", "seeds"] + [_cell(shown.get(n, n)) for n in names]
        lines += ["", "#### Dice per class (mean ± std over seeds)", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for r in rows:
            cells = [_fmt(r["fraction"]), r["init"], _fmt(r["seeds"])]
            cells += [f"{_fmt(r.get(f'dice/{n}', math.nan))} ± {_fmt(r.get(f'dice/{n}_std', math.nan))}"
                      for n in names]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _errorbars(ax, rows: Sequence[Mapping[str, Any]], metric: str) -> None:
    """Mean ``metric`` ± its std over seeds (``<metric>_std``) against the fraction, per init."""
    for init, style in zip(INITS, ("o-", "s--"), strict=True):
        pts = sorted((r for r in rows if r["init"] == init), key=lambda r: r["fraction"])
        if not pts:
            continue
        x = [r["fraction"] for r in pts]
        y = np.array([r.get(metric, math.nan) for r in pts], dtype=float)
        e = np.nan_to_num(np.array([r.get(f"{metric}_std", math.nan) for r in pts], dtype=float))
        ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=init)
    ax.set_xscale("log")
    xs = sorted({r["fraction"] for r in rows})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)


def dice_fraction_figure(rows: Sequence[Mapping[str, Any]], metric: str = "dice/mean"):
    """Mean Dice (error bars: std over seeds) against the label fraction, pretrained and scratch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110, layout="constrained")
    _errorbars(ax, rows, metric)
    ax.set_xlabel("label fraction (of training cases)")
    ax.set_ylabel("Dice, mean over classes" if metric == "dice/mean" else metric.replace("/", " "))
    ax.legend(title="error bars: std over seeds", title_fontsize=7)
    return fig


def per_class_figure(rows: Sequence[Mapping[str, Any]], classes: Mapping[str, str] | Sequence[str] | None = None):
    """One panel per class (titled by its name): Dice ± std over seeds against the label fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _row_classes(rows)
    if not names:
        raise ValueError("the summary rows hold no per-class Dice (dice/<class>)")
    shown = _labels(classes, names)
    cols = min(len(names), 4)
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), dpi=110, squeeze=False,
                             sharey=True, layout="constrained")
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        _errorbars(ax, rows, f"dice/{name}")
        ax.set_title(shown.get(name, name), fontsize=9)
        ax.set_xlabel("label fraction", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("Dice")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8,
               title="error bars: std over seeds", title_fontsize=7)
    return fig


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_dice_vs_fraction(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "dice/mean") -> Path:
    """:func:`dice_fraction_figure` as a PNG at ``path``."""
    return _save(dice_fraction_figure(rows, metric), path)


def plot_dice_per_class(rows: Sequence[Mapping[str, Any]], path: str | Path,
                        classes: Mapping[str, str] | Sequence[str] | None = None) -> Path:
    """:func:`per_class_figure` as a PNG at ``path``."""
    return _save(per_class_figure(rows, classes), path)


VIEWS = ("sagittal", "coronal", "axial")  # the view of a slice fixing axis 0 / 1 / 2 of [X, Y, Z]


def overlay_panel(image: np.ndarray, label: np.ndarray, preds: Mapping[str, np.ndarray], title: str = "",
                  class_names: Sequence[str] | None = None, window: tuple[float, float] = (0.0, 1.0)):
    """Orthogonal slices ``[X, Y, Z]`` through the label's centre of mass (rows: sagittal, coronal,
    axial); columns: ground truth, then each prediction. Segmentations are translucent class
    fills; prediction columns also outline the ground truth. The image window is fixed
    (``window``, the [0, 1] of the prepared intensities); a legend names the classes
    (``class_names[i]`` for label value ``i + 1``; default ``class_<i>``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    img = np.asarray(image)
    lab = np.asarray(label)
    k = max(int(lab.max()), *(int(np.asarray(p).max()) for p in preds.values()), len(class_names or ()), 1)
    names = list(class_names or ())[:k] + [f"class_{i}" for i in range(len(class_names or ()) + 1, k + 1)]
    colors = list(matplotlib.colormaps["tab10" if k <= 10 else "tab20"].colors)[:k]
    cmap, norm = ListedColormap(colors), BoundaryNorm(np.arange(0.5, k + 1.5), k)
    fg = np.argwhere(lab > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(img.shape) // 2
    columns = [("ground truth", lab)] + [(n, np.asarray(p)) for n, p in preds.items()]
    fig, axes = plt.subplots(3, len(columns), figsize=(2.6 * len(columns), 7.8), dpi=100, squeeze=False,
                             layout="constrained")
    for axis, view in enumerate(VIEWS):
        sl = [slice(None)] * 3
        sl[axis] = int(centre[axis])
        truth = np.rot90(lab[tuple(sl)])
        for col, (name, seg) in enumerate(columns):
            ax = axes[axis, col]
            ax.imshow(np.rot90(img[tuple(sl)]), cmap="gray", vmin=window[0], vmax=window[1])
            s = np.rot90(seg[tuple(sl)]).astype(float)
            ax.imshow(np.ma.masked_where(s == 0, s), cmap=cmap, norm=norm, alpha=0.45, interpolation="nearest")
            if col:
                for c in range(1, k + 1):
                    if (truth == c).any():
                        ax.contour(truth == c, levels=[0.5], colors=[colors[c - 1]], linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if axis == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{view} ({'xyz'[axis]}={int(centre[axis])})", fontsize=8)
    handles = [Patch(facecolor=colors[i], alpha=0.45, edgecolor=colors[i], label=names[i]) for i in range(k)]
    if len(columns) > 1:
        handles.append(Line2D([], [], color="0.3", linewidth=1.0, label="ground truth outline"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def overlay_figure(image: np.ndarray, label: np.ndarray, preds: Mapping[str, np.ndarray], path: str | Path,
                   title: str = "", class_names: Sequence[str] | None = None) -> Path:
    """:func:`overlay_panel` as a PNG at ``path``."""
    return _save(overlay_panel(image, label, preds, title, class_names), path)
