"""MPS prior mode: a per-patch lesion score for every crop, computed while ``raymim prepare`` runs.

Masked patch selection (Wang et al., MPS-AMS) clusters a volume's patches by a descriptor and
masks the cluster most likely to hold lesions first. In *prior* mode the descriptors are
intensity statistics computed here, inside the Ray Data preparation tasks, and the clustering is
scikit-learn's; the result is stored per crop as the ``lesion_prob`` shard column (a
``[D/p, H/p, W/p]`` float32 grid, ``p = prepare.prior_patch``) that ``mps_ams`` reads with
``method.mps_mode="prior"``.

Per crop, for each ``p^3`` patch:

1. descriptors [L, 7]: mean, std, min, max, local contrast (mean |difference| to the 6
   neighbouring patches' means; :func:`raymim.masking.selection.patch_intensity_descriptors`),
   and the max and mean of a Hessian **blobness** map (below);
2. per-crop z-scores (the diagonal of the crop's patch covariance), so the crop's mean patch
   is the origin;
3. clustering into ``prepare.prior_clusters`` groups: ``"kmeans"`` (default),
   ``"agglomerative"`` (Ward) or ``"dbscan"`` (``prepare.prior_eps``; its noise points form one
   more cluster) — the three the paper's ablation compares;
4. the lesion-cluster rule of :func:`raymim.masking.selection.lesion_scores`: the most atypical
   cluster scores in [0.5, 1], ranked inside by each patch's own atypicality; the others < 0.5.

**Blobness** (why it is a descriptor): a lesion is a compact region unlike the tissue around
it in every direction. At scale ``s`` (voxels) the Hessian of the Gaussian-smoothed crop has
three eigenvalues of one sign inside a bright or dark blob, but one or two near zero across a
plane (an organ edge) or along a tube (the spine, vessels). ``s^2 * min |eigenvalue|`` where
the signs agree (else 0) is therefore large on blobs only (Lindeberg's scale-normalised
blob measure; it is what nodule detectors in lung CT build on). The max over
``s in (1, 2)`` covers lesions of about 2-8 voxels across.

The score is a ranking within a crop, not a calibrated probability.

Example::

    >>> grid = lesion_prob(crop, PrepareConfig(crop_size=[64, 64, 64], lesion_prior=True))  # [8, 8, 8]
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from raymim.config import PrepareConfig
from raymim.masking.selection import lesion_scores, patch_intensity_descriptors, standardize
from raymim.masking.tokens import patchify

BLOB_SCALES = (1.0, 2.0)


def blobness(volume: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised Hessian blob measure of a 3D array (same shape, >= 0)."""
    v = volume.astype(np.float32, copy=False)
    hess = np.empty(v.shape + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            hess[..., i, j] = hess[..., j, i] = ndimage.gaussian_filter(v, sigma, order=order)
    lam = np.linalg.eigvalsh(hess)  # ascending, [..., 3]
    same_sign = (lam[..., 2] < 0) | (lam[..., 0] > 0)
    return (sigma**2) * np.where(same_sign, np.abs(lam).min(-1), 0.0).astype(np.float32)


def patch_descriptors(crop: np.ndarray, patch: int) -> torch.Tensor:
    """Descriptors of a crop [D, H, W] in [0, 1]: [L, 7] (L = (D/p)(H/p)(W/p), row-major)."""
    x = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    base = patch_intensity_descriptors(x, patch)[0]  # [L, 5]
    blob = np.max([blobness(crop, s) for s in BLOB_SCALES], axis=0)
    pb = patchify(torch.from_numpy(blob)[None, None], patch)[0]  # [L, p^3], same order as `base`
    return torch.cat([base, pb.amax(-1, keepdim=True), pb.mean(-1, keepdim=True)], dim=1)


def cluster_patches(z: np.ndarray, algorithm: str, k: int, eps: float = 1.5, seed: int = 0) -> np.ndarray:
    """scikit-learn clustering of standardised descriptors [L, F] -> labels [L] in [0, K)."""
    from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans

    k = max(1, min(k, len(z)))
    if algorithm == "kmeans":
        return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(z)
    if algorithm == "agglomerative":
        return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z)
    if algorithm == "dbscan":
        labels = DBSCAN(eps=eps, min_samples=4).fit_predict(z)
        return np.where(labels < 0, labels.max() + 1, labels)  # noise: one more cluster
    raise ValueError(f"prepare.prior_algorithm should be one of ('kmeans', 'agglomerative', 'dbscan'), "
                     f"got {algorithm!r}.")


def lesion_prob(crop: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """The ``lesion_prob`` column of one crop [D, H, W]: float32 [D/p, H/p, W/p] in [0, 1]."""
    p = int(cfg.prior_patch)
    grid = tuple(s // p for s in crop.shape)
    z = standardize(patch_descriptors(crop, p)[None])  # [1, L, F]
    labels = cluster_patches(z[0].numpy(), cfg.prior_algorithm, cfg.prior_clusters, cfg.prior_eps, cfg.seed)
    k = int(labels.max()) + 1
    scores = lesion_scores(z, torch.from_numpy(labels).long()[None], k)[0]
    return scores.reshape(grid).numpy().astype(np.float32)


__all__ = ["BLOB_SCALES", "blobness", "cluster_patches", "lesion_prob", "patch_descriptors"]
