"""Phantom batches with label maps (lesion = 8) for the lesion / report / domain-aware method tests."""

from __future__ import annotations

import numpy as np
import torch

from raymim.data.synth import _phantom


def phantom_batch(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Phantoms (sites cycle 0, 1, 2) windowed to [0, 1] like `raymim prepare`: image, label, reports."""
    rng = np.random.default_rng(seed)
    ims, labs, reports = [], [], []
    for i in range(n):
        hu, lab, report, _ = _phantom(rng, size, i % 3)
        ims.append(np.clip((hu + 1000.0) / 2000.0, 0, 1))
        labs.append(lab)
        reports.append(report)
    return torch.tensor(np.stack(ims)).float()[:, None], torch.tensor(np.stack(labs))[:, None], reports


def lesion_masking_factor(mask: torch.Tensor, lesion: torch.Tensor, ratio: float) -> float:
    """How often lesion-holding tokens are masked, over the rate of random masking (= ratio)."""
    return float((mask.bool() & lesion).sum() / lesion.sum()) / ratio
