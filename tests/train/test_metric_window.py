"""The loop's metric window: tensor sums between logs, one read per log, the values of float sums."""

from __future__ import annotations

import pytest
import torch

from raymim.train.loop import MetricWindow


def test_means_match_float_sums_and_the_first_value_is_copied():
    window = MetricWindow()
    loss = torch.tensor(2.0)
    steps = [(loss, torch.tensor(0.5, dtype=torch.bfloat16), 0.75), (torch.tensor(4.0), torch.tensor(1.5), 0.25)]
    for total, rec, ratio in steps:
        window.add("loss", total)
        window.add("loss_rec", rec, 0.5)  # weight: one of two accumulated micro-batches
        window.add("mask_ratio", ratio)  # a host number
    assert loss.item() == 2.0  # the window's in-place sums never write into a method's output
    means = window.means(len(steps))
    assert list(means) == ["loss", "loss_rec", "mask_ratio"] and all(isinstance(v, float) for v in means.values())
    assert means == pytest.approx({"loss": 3.0, "loss_rec": 0.5, "mask_ratio": 0.5})
    window.clear()
    assert window.means(1) == {}


def test_a_non_finite_step_stays_visible_in_the_window():
    window = MetricWindow()
    for v in (1.0, float("nan"), 1.0):
        window.add("loss", torch.tensor(v))
    assert torch.isnan(torch.tensor(window.means(3)["loss"]))
