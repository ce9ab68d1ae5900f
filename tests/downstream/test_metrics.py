"""Metric values against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from raymim.downstream.metrics import aggregate_seeds, per_case_metrics, segmentation_metrics


def cube(shape=(24, 24, 24), lo=(6, 6, 6), size=10, value=1) -> torch.Tensor:
    x = torch.zeros(shape, dtype=torch.long)
    x[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = value
    return x


def surface_points(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: in the mask with at least one 6-neighbour outside (by hand, no MONAI)."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1, 1:-1].copy()
    for ax in range(3):
        for s in (-1, 1):
            inner &= np.roll(m, s, axis=ax)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner).astype(float)


def test_perfect_prediction():
    y = cube()
    y[2:5, 2:5, 2:5] = 2
    m = segmentation_metrics(y, y, num_classes=3)
    for c in ("class_1", "class_2", "mean"):
        assert m[f"dice/{c}"] == pytest.approx(1.0)
        assert m[f"hd95/{c}"] == pytest.approx(0.0)
        assert m[f"nsd/{c}"] == pytest.approx(1.0)
        assert m[f"ppv/{c}"] == pytest.approx(1.0)
        assert m[f"sensitivity/{c}"] == pytest.approx(1.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_shifted_cube_surface_distance(spacing):
    shift = 2
    y = cube()
    p = cube(lo=(6 + shift, 6, 6))
    case = per_case_metrics(p, y, num_classes=2, spacing=spacing, nsd_tolerance_mm=1.0)
    # Dice / PPV / sensitivity by hand: overlap 8 x 10 x 10 of two 1000-voxel cubes.
    assert case["dice"][0] == pytest.approx(0.8)
    assert case["ppv"][0] == pytest.approx(0.8)
    assert case["sensitivity"][0] == pytest.approx(0.8)
    # Surface distances by brute force over boundary voxels, both directions, in mm.
    sp = np.array(spacing)
    a, b = surface_points(p.numpy() > 0) * sp, surface_points(y.numpy() > 0) * sp
    d = cdist(a, b)
    dists = np.concatenate([d.min(1), d.min(0)])
    hd95 = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    assert case["hd95"][0] == pytest.approx(hd95, abs=1e-4)
    assert np.max(dists) == pytest.approx(shift * spacing[0])  # the plain Hausdorff distance
    nsd = (dists <= 1.0).sum() / dists.size
    assert case["nsd"][0] == pytest.approx(nsd, abs=1e-4)


def test_missed_and_absent_classes():
    y = cube(value=1)
    p = torch.zeros_like(y)
    case = per_case_metrics(p, y, num_classes=3)
    assert case["dice"][0] == 0.0 and case["sensitivity"][0] == 0.0
    assert math.isnan(case["hd95"][0]) and math.isnan(case["ppv"][0])
    assert case["missed"][0] == 1.0
    assert all(math.isnan(case[k][1]) for k in ("dice", "nsd", "hd95", "ppv", "sensitivity"))  # class 2 absent
    assert case["absent"].tolist() == [0.0, 1.0] and case["spurious"].tolist() == [0.0, 0.0]


def test_predicted_but_absent_class_is_a_false_positive():
    """nnU-Net / MSD: a class predicted where the reference has none scores Dice 0 and PPV 0, and
    pulls the case's mean down; absent and not predicted stays excluded (and counted)."""
    y = cube(value=1)
    p = y.clone()
    p[0:3, 0:3, 0:3] = 2  # class 2 is not in the reference
    case = per_case_metrics(p, y, num_classes=4)
    assert case["dice"][1] == 0.0 and case["ppv"][1] == 0.0 and case["nsd"][1] == 0.0
    assert math.isnan(case["sensitivity"][1]) and math.isnan(case["hd95"][1])
    assert case["spurious"].tolist() == [0.0, 1.0, 0.0] and case["absent"].tolist() == [0.0, 0.0, 1.0]
    m = segmentation_metrics(p, y, num_classes=4, class_names=["a", "b", "c"])
    assert m["dice/a"] == pytest.approx(1.0) and m["dice/b"] == 0.0 and math.isnan(m["dice/c"])
    assert m["dice/mean"] == pytest.approx(0.5)  # (1 + 0) / 2: class c is excluded, not scored
    assert m["spurious/b"] == 1.0 and m["absent/c"] == 1.0 and m["missed/a"] == 0.0


def test_aggregate_seeds():
    agg = aggregate_seeds([{"dice/mean": 0.5}, {"dice/mean": 0.7}, {"dice/mean": float("nan")}])
    assert agg["dice/mean"] == pytest.approx(0.6)
    assert agg["dice/mean_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
