"""MPS prior mode: a per-patch lesion score for every volume, computed while ``raymim prepare`` runs.

Masked patch selection (Wang et al., MPS-AMS) clusters patches by a descriptor and masks the
cluster most likely to hold lesions first. In *prior* mode the descriptors are intensity
statistics computed here, inside the Ray Data preparation tasks, and the clustering is
scikit-learn's; the result is stored per volume as the ``lesion_prob`` shard column (a
``[X/p, Y/p, Z/p]`` float32 grid aligned with the volume, ``p = prepare.prior_patch``), which
the training sampler crops with the image (:mod:`raymim.data.crops`) and ``mps_ams`` reads with
``method.mps_mode="prior"``. Deviation from the paper's per-image clustering of the network
input: descriptors are computed once on the whole stored volume, so a patch's score does not
change with the crop it falls in.

**Descriptors** (:func:`patch_descriptors`), per ``p^3`` patch [L, 7]: mean, std, min, max,
local contrast (mean |difference| to the 6 neighbouring patches' means;
:func:`raymim.masking.selection.patch_intensity_descriptors`), and the max and mean of a Hessian
**blobness** map (below), each through a signed ``log1p(100 |x|)`` so that heavy tails (a bone
edge's contrast) do not swamp the z-scores.

**Blobness** (why it is a descriptor): a lesion is a compact region unlike the tissue around
it in every direction. At scale ``s`` (voxels) the Hessian of the Gaussian-smoothed crop has
three eigenvalues of one sign inside a bright or dark blob, but one or two near zero across a
plane (an organ edge) or along a tube (the spine, vessels). ``s^2 * min |eigenvalue|`` where
the signs agree (else 0) is therefore large on blobs only (Lindeberg's scale-normalised
blob measure; it is what nodule detectors in lung CT build on). The max over ``s in (1, 2)``
covers lesions of about 2-8 voxels across; the map is grey-dilated by one voxel so a patch
that holds only a lesion's rim still sees its response.

**Lesion-cluster rule**, ``prepare.prior_scope``:

* ``"population"`` (default). The clustering is fitted once per run on the patches of a sample
  of the input (``prepare.prior_fit_cases`` cases, :func:`fit_prior`), z-scored over that
  sample: normal anatomy (parenchyma, fat, air, the body outline, lung borders, bone), which
  recurs in every scan, forms the clusters. Clusters holding at least
  :data:`MIN_CLUSTER_SHARE` of the sample are *normal*; the rest are rare patterns. A patch's
  distance ``d`` to the nearest normal centre measures how badly normal anatomy explains it,
  and ``tau`` is the ``prepare.prior_quantile`` of ``d`` over the sample. The *lesion cluster*
  is the patches with ``d >= tau`` (about ``1 - prior_quantile`` of all patches; every rare
  cluster's members land there), and ``lesion_prob = d / (d + tau)``: >= 0.5 exactly on the
  lesion cluster and ranked inside it. The fitted model (feature means / scales, normal
  centres, ``tau``: aggregate numbers only, nothing per patient) is saved as
  ``prior_model.json`` in the output folder, so a resumed run scores with the same model.
* ``"volume"`` (the paper's per-image clustering, kept as the ablation): z-scores over one
  crop's patches, clustering into ``prior_clusters`` groups, and the most atypical cluster
  (:func:`raymim.masking.selection.lesion_scores`) scored [0.5, 1]. Measured on phantoms it
  mostly picks the body outline and lung borders, which are atypical *within* a crop but
  common across scans (``bench/bench_mps_selection.py``: the population rule masks lesion
  patches about twice as often).

``prepare.prior_algorithm`` picks the scikit-learn clustering: ``"kmeans"`` (default),
``"agglomerative"`` (Ward) or ``"dbscan"`` (``prepare.prior_eps``; noise points are no
cluster), the three the paper's ablation compares. The score is a ranking, not a calibrated
probability.

Example::

    >>> cfg = PrepareConfig(crop_size=[64, 64, 64], lesion_prior=True)
    >>> model = fit_prior(np.concatenate([patch_descriptors(c, 8) for c in sample_crops]), cfg)
    >>> grid = lesion_prob(crop, cfg, model)  # [8, 8, 8]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from raymim.config import PrepareConfig
from raymim.masking.selection import lesion_scores, patch_intensity_descriptors, standardize
from raymim.masking.tokens import patchify

BLOB_SCALES = (1.0, 2.0)
MIN_CLUSTER_SHARE = 0.01  # population scope: clusters with fewer patches are rare patterns, not anatomy
FIT_MAX_PATCHES = {"kmeans": 50_000, "agglomerative": 4_000, "dbscan": 8_000}  # subsample (memory / time)


def sym3_eigvalsh(a00, a11, a22, a01, a02, a12) -> np.ndarray:
    """Eigenvalues of symmetric 3x3 matrices given by their six entries (arrays of one shape),
    ascending in a new last axis: the closed-form trigonometric solution of the characteristic
    cubic, computed in float64 (about 5x faster than ``np.linalg.eigvalsh`` on a 64^3 field of
    matrices, one thread, which dominated :func:`patch_descriptors`; agrees with it to float32
    precision).

    With ``A = q I + p B`` (``q`` = trace / 3, ``p`` = the deviatoric norm / sqrt 6), the
    eigenvalues are ``q + 2 p cos(phi + 2 pi k / 3)`` with ``phi = arccos(det(B) / 2) / 3``.
    """
    a00, a11, a22, a01, a02, a12 = (np.asarray(x, np.float64) for x in (a00, a11, a22, a01, a02, a12))
    q = (a00 + a11 + a22) / 3.0
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    off = a01 * a01 + a02 * a02 + a12 * a12
    p = np.sqrt((b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * off) / 6.0)
    safe = np.where(p > 0, p, 1.0)
    det = (b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02))
    r = np.clip(det / (2.0 * safe**3), -1.0, 1.0)
    phi = np.arccos(r) / 3.0
    top = q + 2.0 * p * np.cos(phi)  # p = 0 (a multiple of I): all three equal q
    low = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    return np.stack([low, 3.0 * q - top - low, top], axis=-1)


def blobness(volume: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised Hessian blob measure of a 3D array (same shape, >= 0)."""
    v = volume.astype(np.float32, copy=False)

    def d2(i: int, j: int) -> np.ndarray:
        order = [0, 0, 0]
        order[i] += 1
        order[j] += 1
        return ndimage.gaussian_filter(v, sigma, order=order)

    lam = sym3_eigvalsh(d2(0, 0), d2(1, 1), d2(2, 2), d2(0, 1), d2(0, 2), d2(1, 2))  # ascending, [..., 3]
    same_sign = (lam[..., 2] < 0) | (lam[..., 0] > 0)
    return (sigma**2) * np.where(same_sign, np.abs(lam).min(-1), 0.0).astype(np.float32)


def patch_descriptors(crop: np.ndarray, patch: int) -> np.ndarray:
    """Descriptors of a crop [D, H, W] in [0, 1]: float32 [L, 7] (L = (D/p)(H/p)(W/p), row-major)."""
    x = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    base = patch_intensity_descriptors(x, patch)[0]  # [L, 5]
    blob = ndimage.grey_dilation(np.max([blobness(crop, s) for s in BLOB_SCALES], axis=0), size=3)
    pb = patchify(torch.from_numpy(blob)[None, None], patch)[0]  # [L, p^3], same order as `base`
    desc = torch.cat([base, pb.amax(-1, keepdim=True), pb.mean(-1, keepdim=True)], dim=1).numpy()
    return (np.sign(desc) * np.log1p(100.0 * np.abs(desc))).astype(np.float32)


def cluster_patches(z: np.ndarray, algorithm: str, k: int, eps: float = 1.5, seed: int = 0) -> np.ndarray:
    """scikit-learn clustering of standardised descriptors [L, F] -> labels [L] (DBSCAN noise: -1)."""
    from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans

    k = max(1, min(k, len(z)))
    if algorithm == "kmeans":
        return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(z)
    if algorithm == "agglomerative":
        return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z)
    if algorithm == "dbscan":
        return DBSCAN(eps=eps, min_samples=4).fit_predict(z)
    raise ValueError(f"prepare.prior_algorithm should be one of ('kmeans', 'agglomerative', 'dbscan'), "
                     f"got {algorithm!r}.")


@dataclass
class PriorModel:
    """The population-scope model: feature means / scales [F], normal centres [C, F], ``tau``."""

    mean: np.ndarray
    scale: np.ndarray
    centres: np.ndarray
    tau: float

    def distance(self, desc: np.ndarray) -> np.ndarray:
        """Distance of descriptors [..., F] to the nearest normal centre: [...]."""
        from sklearn.metrics import pairwise_distances_argmin_min

        z = ((desc - self.mean) / self.scale).reshape(-1, self.centres.shape[1])
        return pairwise_distances_argmin_min(z, self.centres)[1].reshape(desc.shape[:-1])

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "centres": self.centres.tolist(),
                "tau": self.tau}

    @classmethod
    def from_dict(cls, d: dict) -> PriorModel:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["scale"], np.float32),
                   np.asarray(d["centres"], np.float32), float(d["tau"]))


def fit_prior(desc: np.ndarray, cfg: PrepareConfig) -> PriorModel:
    """Fit the population model on pooled descriptors [M, F] (:func:`patch_descriptors` rows)."""
    desc = np.asarray(desc, np.float32)
    if len(desc) < 2 * cfg.prior_clusters:
        raise ValueError(f"the MPS prior needs at least {2 * cfg.prior_clusters} patches to fit "
                         f"{cfg.prior_clusters} clusters, got {len(desc)} (no usable crops in the fit sample?).")
    mean, scale = desc.mean(0), desc.std(0) + 1e-6
    cap = FIT_MAX_PATCHES[cfg.prior_algorithm]
    if len(desc) > cap:
        desc = desc[np.random.default_rng(cfg.seed).choice(len(desc), cap, replace=False)]
    z = (desc - mean) / scale
    labels = cluster_patches(z, cfg.prior_algorithm, cfg.prior_clusters, cfg.prior_eps, cfg.seed)
    ids = [c for c in np.unique(labels) if c >= 0 and (labels == c).mean() >= MIN_CLUSTER_SHARE]
    if not ids:  # e.g. DBSCAN with a tiny eps: everything is noise; the sample mean is the anatomy
        centres = np.zeros((1, z.shape[1]), np.float32)
    else:
        centres = np.stack([z[labels == c].mean(0) for c in ids]).astype(np.float32)
    model = PriorModel(mean, scale, centres, 1.0)
    model.tau = max(float(np.quantile(model.distance(desc), cfg.prior_quantile)), 1e-6)
    return model


def lesion_prob(crop: np.ndarray, cfg: PrepareConfig, model: PriorModel | None = None) -> np.ndarray:
    """The ``lesion_prob`` grid of one volume (or crop) [D, H, W], sides multiples of ``p``:
    float32 [D/p, H/p, W/p] in [0, 1].

    ``model`` is required with ``prior_scope="population"`` (:func:`fit_prior`).
    """
    p = int(cfg.prior_patch)
    grid = tuple(s // p for s in crop.shape)
    desc = patch_descriptors(crop, p)
    if cfg.prior_scope == "population":
        if model is None:
            raise ValueError("prepare.prior_scope='population' needs the fitted prior model (fit_prior).")
        d = model.distance(desc)
        return (d / (d + model.tau)).reshape(grid).astype(np.float32)
    z = standardize(torch.from_numpy(desc)[None])  # [1, L, F]
    labels = cluster_patches(z[0].numpy(), cfg.prior_algorithm, cfg.prior_clusters, cfg.prior_eps, cfg.seed)
    labels = np.where(labels < 0, labels.max() + 1, labels)  # DBSCAN noise: one more cluster
    k = int(labels.max()) + 1
    scores = lesion_scores(z, torch.from_numpy(labels).long()[None], k)[0]
    return scores.reshape(grid).numpy().astype(np.float32)


__all__ = ["BLOB_SCALES", "MIN_CLUSTER_SHARE", "PriorModel", "blobness", "cluster_patches",
           "fit_prior", "lesion_prob", "patch_descriptors", "sym3_eigvalsh"]
