"""Fine-tune outputs from synthetic cell results: class names in tables, plots and overlay legends;
error bars over seeds; results.md is Markdown only."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.container import ErrorbarContainer

from raymim.config import config_from_dict
from raymim.downstream.evaluate import _write_artifacts
from raymim.downstream.metrics import METRICS
from raymim.downstream.report import (
    class_labels,
    dice_fraction_figure,
    markdown_summary,
    overlay_panel,
    per_class_figure,
    result_classes,
    summary_rows,
)
from raymim.downstream.splits import Split

NAMES = ["liver", "lung_right"]
FRACTIONS = (0.5, 1.0)
SEEDS = (0, 1, 2)


def _dice(fraction: float, seed: int, init: str, c: int) -> float:
    """A known per-class Dice: pretrained above scratch, more labels better, seeds spread by 0.02."""
    return 0.4 + 0.3 * fraction + (0.1 if init == "pretrained" else 0.0) + 0.1 * c + 0.02 * (seed - 1)


def _test_metrics(fraction: float, seed: int, init: str, names=NAMES) -> dict[str, float]:
    """A flat metric dict shaped like ``summarize``: ``<metric>/<class>``, ``<metric>/mean``, counts."""
    out: dict[str, float] = {}
    for m in METRICS:
        vals = [_dice(fraction, seed, init, c) if m == "dice" else 0.5 + 0.01 * c for c in range(len(names))]
        out.update({f"{m}/{n}": v for n, v in zip(names, vals, strict=True)})
        out[f"{m}/mean"] = float(np.mean(vals))
    for count in ("missed", "spurious", "absent"):
        out.update({f"{count}/{n}": 0.0 for n in names})
    out["num_cases"] = 2.0
    return out


def _results(names=NAMES, preds=None) -> list[dict]:
    """Cell results shaped like ``raymim.downstream.loop.train_cell``'s."""
    out = []
    for f in FRACTIONS:
        for seed in SEEDS:
            for init in ("pretrained", "scratch"):
                out.append({"key": f"f{f:g}_s{seed}_{init}", "fraction": f, "seed": seed, "init": init,
                            "n_train": int(4 * f), "train_ids": [], "steps": 4, "best_step": 4, "select": "best_val",
                            "val_curve": [], "loss_first": 1.0, "loss_last": 0.5, "train_seconds": 1.0,
                            "seconds": 1.5, "test": _test_metrics(f, seed, init, names),
                            "val": _test_metrics(f, seed, init, names), "load_report": None,
                            "preds": dict(preds or {})})
    return out


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_class_labels_from_names_values_or_keys():
    keys = result_classes(_results(["class_1", "class_2"]))
    assert keys == ["class_1", "class_2"]
    assert class_labels(keys, ["liver", "lung"]) == {"class_1": "liver", "class_2": "lung"}
    assert class_labels(keys, None, [2, 5]) == {"class_1": "label 2", "class_2": "label 5"}
    assert class_labels(keys) == {"class_1": "class_1", "class_2": "class_2"}


def test_summary_has_per_class_mean_and_std_over_seeds():
    rows = summary_rows(_results())
    row = next(r for r in rows if r["fraction"] == 0.5 and r["init"] == "scratch")
    assert row["dice/lung_right"] == pytest.approx(_dice(0.5, 1, "scratch", 1))  # mean over the 3 seeds
    assert row["dice/lung_right_std"] == pytest.approx(0.02)  # seeds at -0.02, 0, +0.02
    assert row["dice/mean"] == pytest.approx(np.mean([_dice(0.5, 1, "scratch", c) for c in (0, 1)]))


def test_markdown_names_classes_in_a_per_class_table():
    rows = summary_rows(_results(["class_1", "class_2"]))
    md = markdown_summary(rows, "t", {"class_1": "liver", "class_2": "lung | right"})
    lines = md.splitlines()
    head = next(i for i, line in enumerate(lines) if "liver" in line)
    assert lines[head] == "| label fraction | init | seeds | liver | lung \\| right |"
    assert lines[head + 1] == "|" + "---|" * 5
    body = lines[head + 2 : head + 2 + len(rows)]
    want = _dice(1.0, 1, "pretrained", 0)
    assert f"| 1 | pretrained | 3 | {want:.4g} ± 0.02 |" in "\n".join(body)
    assert "class_1" not in md  # only the shown names, never the key names
    assert "| 0.5 | scratch | 2 | 3 |" in md  # the mean table stays


def test_results_md_is_markdown_only_and_names_classes(tmp_path):
    cfg = config_from_dict({"finetune": {"classes": [2, 5], "class_names": NAMES, "overlays": 1}})
    image = torch.rand(1, 12, 12, 12)
    label = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    label[0, 3:7, 3:7, 3:7] = 1
    label[0, 7:10, 6:9, 5:9] = 2
    pred = label[0].numpy().copy()
    pred[3, 3:7, 3:7] = 0
    results = _results(preds={"ds__c1": pred})
    rows = [{"fraction": r["fraction"], "init": r["init"], **r["test"]} for r in results]
    split = Split(train=["ds/c2", "ds/c3"], val=["ds/c4"], test=["ds/c1"])
    arts = _write_artifacts(tmp_path, rows, summary_rows(results), results, {"ds/c1": {"image": image, "label": label}},
                            split, cfg, "runs:/abc/encoder", "pretraining overlap not checked")
    names = {a.name for a in arts}
    assert {"results.md", "dice_vs_fraction.png", "dice_per_class.png", "ds_c1.png"} <= names
    md = (tmp_path / "results.md").read_text()
    assert "| label fraction | init | seeds | liver | lung_right |" in md
    for line in md.splitlines():  # headings, table rows, prose; no JSON or code dump
        assert not line.lstrip().startswith(("{", "[", '"', "```")), line
    assert md.rstrip().endswith("results.csv.")
    for art in arts:
        if art.suffix == ".png":
            assert art.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _errorbars(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{label: (y, half height of the error bar)} of an axes' error bars."""
    out = {}
    for cont in ax.containers:
        if isinstance(cont, ErrorbarContainer) and cont.has_yerr:
            line, _, (bars,) = cont.lines
            segs = np.array([s[:, 1] for s in bars.get_segments()])
            out[cont.get_label()] = (np.asarray(line.get_ydata()), (segs[:, 1] - segs[:, 0]) / 2)
    return out


def test_dice_plot_has_error_bars_over_seeds():
    rows = summary_rows(_results())
    fig = dice_fraction_figure(rows)
    (ax,) = fig.axes
    bars = _errorbars(ax)
    assert set(bars) == {"pretrained", "scratch"}
    y, half = bars["pretrained"]
    np.testing.assert_allclose(y, [np.mean([_dice(f, 1, "pretrained", c) for c in (0, 1)]) for f in FRACTIONS])
    np.testing.assert_allclose(half, [0.02, 0.02], atol=1e-9)


def test_per_class_plot_one_titled_panel_per_class_with_error_bars():
    rows = summary_rows(_results(["class_1", "class_2"]))
    fig = per_class_figure(rows, {"class_1": "liver", "class_2": "spleen"})
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.containers]
    assert [ax.get_title() for ax in panels] == ["liver", "spleen"]
    y, half = _errorbars(panels[1])["scratch"]
    np.testing.assert_allclose(y, [_dice(f, 1, "scratch", 1) for f in FRACTIONS])
    np.testing.assert_allclose(half, [0.02, 0.02], atol=1e-9)


def test_overlay_legend_names_classes_and_window_is_fixed():
    rng = np.random.default_rng(0)
    image = rng.random((10, 10, 10)) * 3.0  # outside [0, 1]: the window must not follow the data
    label = np.zeros((10, 10, 10), dtype=np.int64)
    label[2:5, 2:5, 2:5] = 1
    label[5:8, 5:8, 5:8] = 2
    fig = overlay_panel(image, label, {"pretrained (f=1)": label}, "ds/c1", ["liver", "lung_right"])
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["liver", "lung_right", "ground truth outline"]
    grays = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(grays) == 6 and {im.get_clim() for im in grays} == {(0.0, 1.0)}
    assert all(len(ax.images) == 2 for ax in fig.axes if ax.images)  # image + translucent class fill
    fill = fig.axes[0].images[1]
    assert 0 < fill.get_alpha() < 1
    assert [ax.get_ylabel().split(" ")[0] for ax in fig.axes if ax.get_ylabel()] == ["sagittal", "coronal", "axial"]
    # Prediction columns outline the ground truth; the ground-truth column does not.
    contours = [len(ax.collections) for ax in fig.axes if ax.images]
    assert contours[0::2] == [0, 0, 0] and all(c > 0 for c in contours[1::2])
    unnamed = overlay_panel(image, label, {})
    assert [t.get_text() for t in unnamed.legends[0].get_texts()] == ["class_1", "class_2"]
    assert not math.isnan(float(fill.get_array().max()))
