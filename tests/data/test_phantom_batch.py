"""``phantom_batch``: in-memory phantoms for benchmarks and tests, windowed like ``raymim prepare``."""

from __future__ import annotations

import pytest
import torch

from raymim.data.synth import LESION, phantom_batch


def test_phantom_batch_shapes_range_and_determinism():
    image, label, reports = phantom_batch(3, size=32, seed=5)
    assert image.shape == label.shape == (3, 1, 32, 32, 32) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    assert (label == LESION).any() and len(reports) == 3
    assert all(r.startswith("CT ") and " in the " in r for r in reports)  # a finding per report
    again, label2, reports2 = phantom_batch(3, size=32, seed=5)
    assert torch.equal(image, again) and torch.equal(label, label2) and reports == reports2
    assert not torch.equal(image, phantom_batch(3, size=32, seed=6)[0])


def test_phantoms_are_reused_only_when_made_with_the_same_arguments(tmp_path):
    from raymim.data.synth import reuse_or_generate_phantoms

    told: list[str] = []
    first = reuse_or_generate_phantoms(tmp_path / "p", cases=2, size=16, seed=3, log=told.append)
    stamp = first.stat().st_mtime_ns
    again = reuse_or_generate_phantoms(tmp_path / "p", cases=2, size=16, seed=3, log=told.append)
    assert again == first and first.stat().st_mtime_ns == stamp and len(told) == 1  # generated once
    with pytest.raises(ValueError, match="'size': 16.*'size': 24"):
        reuse_or_generate_phantoms(tmp_path / "p", cases=2, size=24, seed=3)
