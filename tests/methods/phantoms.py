"""Phantom batches with label maps (lesion = 8) for the lesion / report / domain-aware method tests."""

from __future__ import annotations

import re
from concurrent.futures import Executor
from itertools import repeat

import numpy as np
import torch

from raymim.config import PrepareConfig
from raymim.data.patch_stats import PriorModel, fit_prior, lesion_prob, patch_descriptors
from raymim.data.synth import LESION
from raymim.data.synth import phantom_batch as phantom_batch  # re-exported for the method tests
from raymim.masking.tokens import patchify

# The generator's organ labels by (side, organ) as its reports name them.
ORGAN_LABEL = {("right", "liver"): 2, ("right", "kidney"): 3, ("left", "kidney"): 4, ("right", "lung"): 5,
               ("left", "lung"): 6}


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


def named_sites(report: str) -> set[tuple[str, str]]:
    """The (side, organ) pairs a phantom report's findings name."""
    return set(re.findall(r"in the (right|left) (liver|kidney|lung)", report))


def named_patches(labels: torch.Tensor, reports: list[str], patch: int) -> torch.Tensor:
    """[N, L] bool: patches at least 25 % inside an organ + side that the report names, its lesions included.

    The generator overwrites a lesion's voxels with label 8 (``LESION``) and names every lesion it
    places in the report, so the named region is the named organs' labels plus every label-8 voxel.
    """
    masks = []
    for lab, rep in zip(labels, reports, strict=True):
        m = lab == LESION
        for site in named_sites(rep):
            m |= lab == ORGAN_LABEL[site]
        masks.append(m)
    return patchify(torch.stack(masks).float(), patch).mean(-1) >= 0.25


def disjoint_reports(reports: list[str], sites: int = 3) -> list[str]:
    """For each report, the next one of the same site (``phantom_batch`` cycles ``sites``) that names
    none of its organ + side pairs: a control whose words point elsewhere in the same kind of image."""
    out = []
    n = len(reports)
    for i, rep in enumerate(reports):
        own = named_sites(rep)
        js = [(i + k * sites) % n for k in range(1, n // sites + 1)]
        j = next((j for j in js if j != i and not named_sites(reports[j]) & own), None)
        if j is None:
            raise ValueError(f"no same-site report names none of {sorted(own)}; draw more phantoms.")
        out.append(reports[j])
    return out
