"""Sweep summary artifacts: the trials table (CSV, Markdown) and objective-vs-parameter plots."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

OBJECTIVE = "val_dice"  # raymim.tune.driver.OBJECTIVE
COLUMNS_TAIL = (OBJECTIVE, "test_dice", "probe_loss", "loss", "step", "status", "trial", "mlflow_run_id")
HIDDEN = ("checkpoint_path", "params")


def _columns(table: list[dict[str, Any]]) -> list[str]:
    keys = [k for k in (table[0] if table else {}) if k not in COLUMNS_TAIL and k not in HIDDEN]
    return keys + [c for c in COLUMNS_TAIL if not table or c in table[0]]


def write_table_csv(table: list[dict[str, Any]], path: Path) -> Path:
    cols = _columns(table)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    return path


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def table_markdown(table: list[dict[str, Any]], keys: list[str]) -> str:
    cols = _columns(table)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in table]
    return ("Trials sorted by the objective (quick fine-tune Dice on the validation cases), best first; "
            "test_dice is computed for the selected trial only. probe_loss: the held-out reconstruction "
            "probe ASHA compares.\n\n" + "\n".join(lines) + "\n")


def plot_objective(table: list[dict[str, Any]], keys: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    done = [r for r in table if r.get(OBJECTIVE) is not None]
    for ax, key in zip(axes[0], keys or ["(none)"]):
        xs = [r.get(key) for r in done]
        numeric = all(isinstance(x, int | float) for x in xs)
        labels = xs if numeric else [str(x) for x in xs]
        ax.scatter(labels, [r[OBJECTIVE] for r in done])
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel("validation Dice (quick fine-tune)", fontsize=8)
        if numeric and xs and min(xs) > 0 and max(xs) / min(xs) > 50:
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
