"""``phantom_batch``: in-memory phantoms for benchmarks and tests, windowed like ``raymim prepare``."""

from __future__ import annotations

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
