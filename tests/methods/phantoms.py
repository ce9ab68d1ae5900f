"""Phantom batches with label maps (lesion = 8) for the lesion / report / domain-aware method tests."""

from __future__ import annotations

from concurrent.futures import Executor
from itertools import repeat

import numpy as np
import torch

from raymim.config import PrepareConfig
from raymim.data.patch_stats import PriorModel, fit_prior, lesion_prob, patch_descriptors
from raymim.data.synth import disjoint_reports as disjoint_reports  # re-exported for the method tests
from raymim.data.synth import named_sites as named_sites
from raymim.data.synth import named_voxels
from raymim.data.synth import phantom_batch as phantom_batch
from raymim.masking.tokens import patchify


def lesion_masking_factor(mask: torch.Tensor, lesion: torch.Tensor, ratio: float) -> float:
    """How often lesion-holding tokens (or any region's tokens, [N, L] bool) are masked, over the
    rate of random masking (= ratio)."""
    return float((mask.bool() & lesion).sum() / lesion.sum()) / ratio


def fit_phantom_prior(images: torch.Tensor, cfg: PrepareConfig) -> PriorModel:
    """The MPS population prior fitted on phantoms [N, 1, S, S, S] (``cfg.prior_patch`` patches)."""
    return fit_prior(np.concatenate([patch_descriptors(v[0].numpy(), int(cfg.prior_patch)) for v in images]), cfg)


def _prior_one(crop: np.ndarray, cfg: PrepareConfig, model: dict) -> torch.Tensor:
    return torch.from_numpy(lesion_prob(crop, cfg, PriorModel.from_dict(model)))


def phantom_priors(images: torch.Tensor, cfg: PrepareConfig, model: PriorModel,
                   pool: Executor | None = None) -> torch.Tensor:
    """The MPS ``lesion_prob`` grid of every phantom [N, 1, S, S, S] -> [N, S/p, S/p, S/p] (on ``pool`` if any)."""
    args = (_prior_one, [v[0].numpy() for v in images], repeat(cfg), repeat(model.to_dict()))
    return torch.stack(list(pool.map(*args, chunksize=8) if pool else map(*args)))


def named_patches(labels: torch.Tensor, reports: list[str], patch: int) -> torch.Tensor:
    """[N, L] bool: patches at least 25 % inside an organ + side that the report names, its lesions
    included (:func:`raymim.data.synth.named_voxels`)."""
    return patchify(named_voxels(labels, reports).float(), patch).mean(-1) >= 0.25
