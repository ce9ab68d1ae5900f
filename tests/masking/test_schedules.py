"""AMS schedules: endpoints, monotonicity, warm-up, validation."""

from __future__ import annotations

import pytest

from raymim.masking.schedules import SCHEDULES, mask_ratio_at


@pytest.mark.parametrize("kind", ["linear", "cosine", "step"])
@pytest.mark.parametrize("start,end", [(0.5, 0.9), (0.9, 0.6)])
def test_endpoints_and_monotonic(kind: str, start: float, end: float):
    values = [mask_ratio_at(i / 100, kind, start, end, warmup=0.1, stages=3) for i in range(101)]
    assert values[0] == pytest.approx(start) and values[10] == pytest.approx(start)  # warm-up holds
    assert values[-1] == pytest.approx(end)
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s >= -1e-12 for s in steps) if end >= start else all(s <= 1e-12 for s in steps)
    assert min(values) >= min(start, end) - 1e-12 and max(values) <= max(start, end) + 1e-12


def test_shapes_of_the_curves():
    assert mask_ratio_at(0.5, "linear", 0.4, 0.8) == pytest.approx(0.6)
    assert mask_ratio_at(0.25, "cosine", 0.4, 0.8) < mask_ratio_at(0.25, "linear", 0.4, 0.8)
    assert sorted({round(mask_ratio_at(t / 20, "step", 0.4, 0.8, stages=3), 6) for t in range(21)}) == [0.4, 0.6, 0.8]
    assert mask_ratio_at(0.3, "constant", 0.1, 0.75) == 0.75
    assert mask_ratio_at(1.7, "linear", 0.4, 0.8) == pytest.approx(0.8)  # clamped


def test_validation():
    assert set(SCHEDULES) == {"constant", "linear", "cosine", "step"}
    with pytest.raises(ValueError, match="'exp'"):
        mask_ratio_at(0.5, "exp", 0.4, 0.8)
    with pytest.raises(ValueError, match="1.0"):
        mask_ratio_at(0.5, "linear", 0.4, 0.8, warmup=1.0)
