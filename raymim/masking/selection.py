"""Masked patch selection (MPS): cluster a volume's patches, mask the lesion cluster first.

Wang et al. (MPS-AMS) describe a descriptor per patch, a covariance / similarity matrix between
the patches of an image, a clustering into ``k`` groups, and masking the group most likely to
hold lesions; the formulas are not public. The rule used here, explicit:

**Lesion-cluster rule (atypicality).** Standardise each descriptor feature over the patches of
*one volume* (z-scores: the diagonal of the volume's patch covariance), so that the volume's
mean patch is the origin. The atypicality of a cluster is the norm of its mean z-descriptor,
i.e. the diagonal Mahalanobis distance between the cluster's mean patch and the volume's mean
patch. The most atypical cluster is the lesion cluster. Why: a lesion is small and unlike the
tissue around it, so the patches holding it are few and far from the bulk; large homogeneous
regions (parenchyma, fat, air) form clusters near the mean because they *make* the mean. A
per-patch lesion score is in [0.5, 1] on the lesion cluster (0.5 + half the patch's own
atypicality over the cluster's most atypical patch, so the cluster is ranked inside too) and
half the relative cluster atypicality elsewhere (< 0.5, see :func:`lesion_scores`); it is a
ranking, not a calibrated probability. Bone or sharp organ edges are atypical too and get
masked early: masking hard, rare content first is the point of MPS either way.

Masking (:func:`mps_masking`): lesion-cluster tokens (score >= ``threshold``) first, highest
score first (with a little noise, so masks still vary), at most ``share`` of the masked tokens;
random tokens fill up to the exact ratio.

Shapes: ``desc: [N, L, F]``, ``scores: [N, L]`` in [0, 1], masks as in :mod:`raymim.masking.tokens`.

Example::

    >>> desc = patch_intensity_descriptors(torch.rand(2, 1, 32, 32, 32), patch=8)  # [2, 64, 5]
    >>> assign, centres = kmeans(standardize(desc).flatten(0, 1), k=4)             # pooled
    >>> scores = lesion_scores(standardize(desc), assign.view(2, 64), k=4)         # [2, 64]
    >>> tm = mps_masking(scores, mask_ratio=0.6)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from raymim.masking.tokens import TokenMask, mask_from_scores, num_masked, patchify


def patch_intensity_descriptors(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """Intensity statistics per patch: [N, C, D, H, W] -> [N, L, 5] (mean, std, min, max, |grad|).

    ``|grad|`` is the patch's mean absolute difference to its 6 neighbouring patches' means
    (local contrast: a lesion differs from its surroundings, a large organ does not).
    """
    p = patchify(imgs.float(), patch)  # [N, L, p^3 C]
    mean = p.mean(-1)
    n = imgs.shape[0]
    g = [s // patch for s in imgs.shape[2:]]
    m = mean.view(n, 1, *g)
    pad = F.pad(m, (1, 1, 1, 1, 1, 1), mode="replicate")
    shifts = [
        pad[:, :, 2:, 1:-1, 1:-1], pad[:, :, :-2, 1:-1, 1:-1],
        pad[:, :, 1:-1, 2:, 1:-1], pad[:, :, 1:-1, :-2, 1:-1],
        pad[:, :, 1:-1, 1:-1, 2:], pad[:, :, 1:-1, 1:-1, :-2],
    ]  # fmt: skip
    contrast = torch.stack([(m - s).abs() for s in shifts]).mean(0).view(n, -1)
    return torch.stack([mean, p.std(-1), p.amin(-1), p.amax(-1), contrast], dim=-1)


def standardize(desc: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-volume z-scores of each feature: [N, L, F] -> [N, L, F] (volume mean patch at 0)."""
    mu = desc.mean(dim=1, keepdim=True)
    sd = desc.std(dim=1, keepdim=True)
    return (desc - mu) / (sd + eps)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the device of ``x``: [M, F] -> (assign [M] long, centres [k, F]).

    k-means++ seeding unless ``init`` [k, F] is given (warm start from the last refit); an
    empty cluster is re-seeded at the point farthest from its centre. Runs exactly ``iters``
    Lloyd iterations: a converged assignment is a fixed point, so the result is the one an early
    stop would return, and no convergence test has to read a value back to the host (on a GPU,
    with ``generator=None``, the whole fit runs without a synchronisation; a ``generator`` draws
    the seeds on the host and copies the seeding probabilities there).
    """
    x = x.float()
    m = x.shape[0]
    k = min(k, m)
    if init is not None:
        centres = init.to(x).clone()
    else:
        first = torch.randint(m, (1,), generator=generator, device="cpu").item()
        centres = x[first : first + 1]
        for _ in range(1, k):
            d2 = torch.cdist(x, centres).pow(2).amin(1)  # [M]
            total = d2.sum()
            probs = torch.where(total > 0, d2 / total.clamp_min(1e-30), torch.full_like(d2, 1.0 / m))
            if generator is not None:
                idx = torch.multinomial(probs.cpu(), 1, generator=generator).to(x.device)
            else:
                idx = torch.multinomial(probs, 1)  # [1], stays on the device
            centres = torch.cat([centres, x.index_select(0, idx)])
    assign = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        # index_add_ rather than bincount, whose output length depends on the data (a read-back on GPU).
        counts = x.new_zeros(k).index_add_(0, assign, x.new_ones(m)).unsqueeze(1)
        new = sums / counts.clamp_min(1.0)
        empty = counts == 0  # [k, 1]
        far = torch.cdist(x, new).amin(1).argmax()
        centres = torch.where(empty, x.index_select(0, far.view(1)), new)
        assign = torch.cdist(x, centres).argmin(1)
    return assign, centres


def cluster_atypicality(z: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Norm of each cluster's mean z-descriptor, per volume: z [N, L, F], assign [N, L] -> [N, k].

    Clusters absent from a volume get -1. Labels outside [0, k) (e.g. DBSCAN noise, -1) must be
    remapped by the caller.
    """
    n, _, f = z.shape
    one_hot = F.one_hot(assign.long(), k).to(z.dtype)  # [N, L, k]
    counts = one_hot.sum(1)  # [N, k]
    means = torch.einsum("nlk,nlf->nkf", one_hot, z) / counts.clamp_min(1.0).unsqueeze(-1)
    atyp = means.norm(dim=-1) / (f**0.5)
    return torch.where(counts > 0, atyp, torch.full_like(atyp, -1.0))


def lesion_scores(z: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Per-patch lesion score in [0, 1]: [0.5, 1] on the lesion cluster, below 0.5 elsewhere.

    z: [N, L, F] standardised descriptors, assign: [N, L] cluster ids in [0, k). A patch of the
    lesion cluster (most atypical) scores ``0.5 + 0.5 * a / a_max`` with ``a`` its own
    atypicality (norm of its z-descriptor) and ``a_max`` the cluster's largest, so the most
    atypical patch scores exactly 1; another cluster scores half its atypicality over the lesion
    cluster's (< 0.5), so ``threshold=0.5`` selects exactly the lesion cluster while the stored
    column still ranks the rest.
    """
    atyp = cluster_atypicality(z, assign, k)  # [N, k], -1 for absent clusters
    top = atyp.amax(1, keepdim=True)
    rel = (0.5 * atyp.clamp_min(0.0) / top.clamp_min(1e-12)).clamp_max(0.499)  # other clusters
    patch_rel = torch.gather(rel, 1, assign.long())  # [N, L]
    in_lesion = torch.gather(atyp >= top, 1, assign.long())  # [N, L]
    own = z.norm(dim=-1)  # [N, L]
    own_max = torch.where(in_lesion, own, torch.zeros_like(own)).amax(1, keepdim=True)
    inside = 0.5 + 0.5 * own / own_max.clamp_min(1e-12)
    return torch.where(in_lesion, inside.clamp(0.5, 1.0), patch_rel)


def mps_masking(
    scores: torch.Tensor,
    mask_ratio: float,
    share: float = 1.0,
    threshold: float = 0.5,
    *,
    jitter: float = 0.05,
    generator: torch.Generator | None = None,
) -> TokenMask:
    """Mask lesion-cluster tokens first, then random ones, at an exact ratio.

    scores: [N, L] lesion scores (>= ``threshold`` marks the lesion cluster). At most
    ``round(share * n_mask)`` masked tokens come from the lesion cluster (its highest-scoring
    ones when it is larger, give or take ``jitter`` of score); the rest are uniform over the
    remaining tokens.
    """
    n, length = scores.shape
    n_mask = num_masked(length, mask_ratio)
    cap = int(round(share * n_mask))
    noise = torch.rand(n, length, generator=generator).to(scores.device)
    lesion = scores >= threshold
    # Rank lesion tokens by score (jittered); keep the first `cap` as "masked first".
    lesion_noise = torch.where(lesion, jitter * noise - scores, torch.full_like(noise, 2.0))
    rank = torch.argsort(torch.argsort(lesion_noise, dim=1), dim=1)
    first = lesion & (rank < cap)
    return mask_from_scores(noise - 2.0 * first.to(noise.dtype), n_mask)


def mps_cube_scores(
    scores: torch.Tensor,
    grid: Sequence[int],
    block: int,
    share: float = 1.0,
    threshold: float = 0.5,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token order for masking whole ``block^3`` cubes, lesion cubes first: [N, L] (low = first).

    A cube is a lesion cube when any of its tokens scores >= ``threshold``; lesion cubes come
    first (random order, at most ``share`` of the cubes), then the others in random order. Feed
    the result to :func:`raymim.masking.tokens.mask_from_scores` (MiM levels with MPS).
    """
    gd, gh, gw = (int(g) for g in grid)
    if gd % block or gh % block or gw % block:
        raise ValueError(f"block={block} should divide the token grid {tuple(grid)}.")
    n = scores.shape[0]
    s = scores.view(n, 1, gd, gh, gw)
    cube = F.max_pool3d(s, block).flatten(1)  # [N, cubes]
    n_cubes = cube.shape[1]
    noise = torch.rand(n, n_cubes, generator=generator).to(scores.device)
    lesion = cube >= threshold
    cap = int(round(share * n_cubes))
    rank = torch.argsort(torch.argsort(torch.where(lesion, noise, torch.full_like(noise, 2.0)), 1), 1)
    key = noise - 2.0 * (lesion & (rank < cap)).to(noise.dtype)
    order = torch.argsort(torch.argsort(key, 1), 1).to(scores.dtype)  # cube rank [N, cubes]
    cd, ch, cw = gd // block, gh // block, gw // block
    per_token = F.interpolate(order.view(n, 1, cd, ch, cw), scale_factor=block, mode="nearest")
    jitter = torch.rand(n, gd * gh * gw, generator=generator).to(scores.device) * 0.5
    return per_token.reshape(n, -1) + jitter


def prior_token_scores(prob: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """A stored ``lesion_prob`` grid [B, L'] (or [B, d, h, w]) resampled to a model's token ``grid``: [B, L].

    The shards keep the MPS prior on the ``prepare.prior_patch`` grid; a model with larger
    tokens takes the max of the stored patches it covers (a lesion patch stays visible), one
    with smaller tokens repeats them.
    """
    g = tuple(int(v) for v in grid)
    prob = prob.float().reshape(prob.shape[0], -1)  # the stored [B, d, h, w] grid, row-major
    side = round(prob.shape[1] ** (1 / 3))
    if side**3 != prob.shape[1]:
        raise ValueError(f"lesion_prob should hold a cubic token grid, got {prob.shape[1]} tokens.")
    vol = prob.view(-1, 1, side, side, side)
    if (side,) * 3 != g:
        vol = F.adaptive_max_pool3d(vol, g) if side > g[0] else F.interpolate(vol, size=g, mode="nearest")
    return vol.reshape(prob.shape[0], -1)


def lesion_token_mask(label: torch.Tensor, patch: int, lesion_label: int = 8) -> torch.Tensor:
    """Which tokens hold lesion voxels: label [N, 1, D, H, W] -> [N, L] bool (for evaluation)."""
    return patchify((label == lesion_label).float(), patch).amax(-1) > 0


__all__ = [
    "cluster_atypicality",
    "kmeans",
    "lesion_scores",
    "lesion_token_mask",
    "mps_cube_scores",
    "mps_masking",
    "patch_intensity_descriptors",
    "prior_token_scores",
    "standardize",
]
