"""Segmentation metrics per class and mean: Dice, NSD, HD95, PPV, sensitivity.

All values come from MONAI's metric implementations (``DiceMetric``, ``SurfaceDiceMetric``,
``HausdorffDistanceMetric`` and ``get_confusion_matrix`` / ``compute_confusion_matrix_metric``);
this module only one-hot encodes, passes the voxel spacing in mm, and names the results.

Conventions (the ones MONAI and the Medical Segmentation Decathlon use):

- background (class 0) is excluded; classes are reported as ``dice/<name>`` etc.;
- a class absent from the ground truth of a case **and predicted there** is a false positive
  and is scored as nnU-Net and the MSD evaluation score it: Dice 0, NSD 0, PPV 0; sensitivity
  and HD95 are undefined (``nan``: no reference voxels, no reference surface).
  ``spurious/<name>`` counts those cases;
- a class absent from the ground truth and not predicted is excluded from that case's means
  (every metric ``nan``: there is nothing to get right or wrong) and counted as
  ``absent/<name>``, so a table says how many cases a per-class mean is over;
- a class present in the ground truth but not predicted gives Dice 0, NSD 0, sensitivity 0 and
  ``nan`` for HD95 / PPV (no predicted surface); ``missed/<name>`` counts those cases so a mean
  HD95 over the remaining cases never hides them;
- means over classes and cases ignore ``nan`` (``nanmean``).

Example::

    m = segmentation_metrics(pred, label, num_classes=3, spacing=(1.5, 1.5, 2.0))
    m["dice/mean"], m["hd95/class_1"]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import (
    DiceMetric,
    HausdorffDistanceMetric,
    SurfaceDiceMetric,
    compute_confusion_matrix_metric,
    get_confusion_matrix,
)
from monai.networks.utils import one_hot

METRICS = ("dice", "nsd", "hd95", "ppv", "sensitivity")
# Per-class case counts: reference present but nothing predicted; predicted but absent from the
# reference (scored 0); absent and not predicted (excluded).
COUNTS = ("missed", "spurious", "absent")


def class_names_for(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    """Names of the foreground classes 1..num_classes-1 (``class_1`` ... when not given)."""
    if names is not None:
        if len(names) != num_classes - 1:
            raise ValueError(f"names should name the {num_classes - 1} foreground classes, got {list(names)}.")
        return list(names)
    return [f"class_{i}" for i in range(1, num_classes)]


def per_case_metrics(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, np.ndarray]:
    """Per-class metric arrays for one case.

    pred, label: integer label maps, ``[X, Y, Z]`` or ``[1, X, Y, Z]`` (class ids 0..num_classes-1).
    Returns ``{metric: array[num_classes - 1]}`` for each of :data:`METRICS`.
    """
    p = _as_batch(pred)
    y = _as_batch(label)
    if p.shape != y.shape:
        raise ValueError(f"pred and label should have the same shape, got {tuple(p.shape)} and {tuple(y.shape)}.")
    p1 = one_hot(p, num_classes=num_classes, dim=1)  # [1, C, X, Y, Z]
    y1 = one_hot(y, num_classes=num_classes, dim=1)
    spacing = [float(s) for s in spacing]
    nfg = num_classes - 1

    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p1, y1)[0]
    with warnings.catch_warnings():
        # MONAI warns for empty masks; those cases are handled (set to nan / counted) below.
        warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf distance")
        # MONAI 1.6's own surface metrics pass a deprecated argument to get_mask_edges.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        nsd = SurfaceDiceMetric(
            class_thresholds=[float(nsd_tolerance_mm)] * nfg, include_background=False, reduction="none"
        )(p1, y1, spacing=spacing)[0]
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            p1, y1, spacing=spacing
        )[0]
    cm = get_confusion_matrix(p1, y1, include_background=False)  # [1, C-1, 4]: tp, fp, tn, fn
    ppv = compute_confusion_matrix_metric("precision", cm)[0]
    sens = compute_confusion_matrix_metric("sensitivity", cm)[0]

    out = {
        "dice": dice.double().cpu().numpy(),
        "nsd": nsd.double().cpu().numpy(),
        "hd95": hd95.double().cpu().numpy(),
        "ppv": ppv.double().cpu().numpy(),
        "sensitivity": sens.double().cpu().numpy(),
    }
    gt_present = y1[0, 1:].flatten(1).any(1).cpu().numpy()
    pred_present = p1[0, 1:].flatten(1).any(1).cpu().numpy()
    spurious = ~gt_present & pred_present  # a false-positive class: predicted, not in the reference
    absent = ~gt_present & ~pred_present  # nothing to score: excluded from this case
    for key in out:
        out[key] = np.where(gt_present, out[key], np.nan)
    for key in ("dice", "nsd", "ppv"):
        out[key] = np.where(spurious, 0.0, out[key])
    # Predicted nothing: surface metrics are undefined (MONAI returns nan or inf); keep nan.
    out["hd95"] = np.where(pred_present & gt_present & np.isfinite(out["hd95"]), out["hd95"], np.nan)
    out["ppv"] = np.where(pred_present, out["ppv"], np.nan)
    out["missed"] = (gt_present & ~pred_present).astype(np.float64)
    out["spurious"] = spurious.astype(np.float64)
    out["absent"] = absent.astype(np.float64)
    return out


def summarize(cases: Sequence[dict[str, np.ndarray]], class_names: Sequence[str]) -> dict[str, float]:
    """Flat dict over cases: ``<metric>/<class>`` (nanmean over cases), ``<metric>/mean`` (nanmean
    over classes of those), and the per-class case counts of :data:`COUNTS` (``missed/<class>``,
    ``spurious/<class>``, ``absent/<class>``)."""
    out: dict[str, float] = {}
    if not cases:
        return out
    for metric in METRICS:
        stack = np.stack([c[metric] for c in cases])  # [cases, classes]
        per_class = _nanmean(stack, axis=0)
        for name, value in zip(class_names, per_class):
            out[f"{metric}/{name}"] = float(value)
        out[f"{metric}/mean"] = float(_nanmean(per_class, axis=0))
    for count in COUNTS:
        totals = np.stack([c[count] for c in cases]).sum(0)
        for name, value in zip(class_names, totals):
            out[f"{count}/{name}"] = float(value)
    out["num_cases"] = float(len(cases))
    return out


def segmentation_metrics(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    nsd_tolerance_mm: float = 2.0,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """One case's flat metric dict (:func:`per_case_metrics` then :func:`summarize`)."""
    case = per_case_metrics(pred, label, num_classes, spacing, nsd_tolerance_mm)
    return summarize([case], class_names_for(num_classes, class_names))


def aggregate_seeds(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean and std over seeds of every numeric key: ``{key: mean, key + "_std": std}``."""
    keys = sorted({k for r in results for k, v in r.items() if isinstance(v, int | float)})
    out: dict[str, float] = {}
    for key in keys:
        vals = np.array([float(r[key]) for r in results if key in r], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        out[key] = float(finite.mean()) if finite.size else math.nan
        out[f"{key}_std"] = float(finite.std(ddof=1)) if finite.size > 1 else (0.0 if finite.size else math.nan)
    return out


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    count = np.isfinite(a).sum(axis=axis)
    total = np.where(np.isfinite(a), a, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected a label map [X, Y, Z] or [1, X, Y, Z], got shape {tuple(x.shape)}.")
    return x[None].long()  # [1, 1, X, Y, Z]
