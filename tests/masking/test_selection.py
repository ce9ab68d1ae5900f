"""MPS: the patch covariance / similarity matrices, their clustering, the lesion-cluster rule,
exact-ratio masks, and lesion masking on phantoms against random masking."""

from __future__ import annotations

import pytest
import torch

from raymim.masking.selection import (
    centre,
    cluster_atypicality,
    cluster_similarity,
    kmeans,
    lesion_scores,
    lesion_token_mask,
    mps_cube_scores,
    mps_masking,
    patch_covariance,
    patch_intensity_descriptors,
    patch_similarity,
    standardize,
)
from raymim.masking.tokens import mask_from_scores, num_masked, random_masking
from tests.methods.phantoms import lesion_masking_factor, phantom_batch


def test_batched_kmeans_finds_separated_blobs_per_set():
    torch.manual_seed(0)
    blobs = [torch.cat([torch.randn(30, 2) * 0.1 + c, torch.randn(30, 2) * 0.1 - c]) for c in
             (torch.tensor([5.0, 5]), torch.tensor([-4.0, 6]))]
    assign, centres = kmeans(torch.stack(blobs), 2)  # two sets, each clustered on its own
    assert centres.shape == (2, 2, 2)
    for a in assign:
        assert len(set(a[:30].tolist())) == 1 and len(set(a[30:].tolist())) == 1 and a[0] != a[-1]
    flat, _ = kmeans(blobs[0], 2)  # a 2-D input is one set
    assert flat.shape == (60,) and flat[0] != flat[-1]


def test_covariance_similarity_and_the_rule_agree():
    """The atypicality the rule uses is sqrt(mean C_ij) over a cluster: the same from the matrix."""
    torch.manual_seed(0)
    desc = torch.randn(2, 20, 6)
    cov = patch_covariance(desc)
    sim = patch_similarity(cov)
    assert cov.shape == (2, 20, 20) and torch.allclose(cov, cov.transpose(1, 2), atol=1e-6)
    assert torch.allclose(torch.diagonal(sim, dim1=1, dim2=2), torch.ones(2, 20), atol=1e-5)
    assign = cluster_similarity(sim, 3)
    assert assign.shape == (2, 20) and int(assign.max()) < 3
    one_hot = torch.nn.functional.one_hot(assign, 3).float()
    counts = one_hot.sum(1)
    from_matrix = (torch.einsum("nik,nij,njk->nk", one_hot, cov, one_hot) / counts.clamp_min(1) ** 2).sqrt()
    atyp = cluster_atypicality(centre(desc), assign, 3)
    assert torch.allclose(torch.where(counts > 0, from_matrix, -torch.ones_like(atyp)), atyp, atol=1e-4)


def test_rule_picks_the_small_atypical_cluster_and_masks_it_first():
    z = torch.zeros(1, 64, 2)
    z[0, :60] = torch.randn(60, 2) * 0.1
    z[0, 60:] = 5.0  # four far-out patches: the lesion cluster
    z = standardize(z)
    assign = torch.zeros(1, 64, dtype=torch.long)
    assign[0, 60:] = 1
    scores = lesion_scores(z, assign, 2)
    assert torch.all(scores[0, 60:] == 1.0) and torch.all(scores[0, :60] < 0.5)
    tm = mps_masking(scores, 0.25)
    assert tm.mask.sum() == num_masked(64, 0.25) and torch.all(tm.mask[0, 60:] == 1)
    capped = mps_masking(scores, 0.25, share=2 / 16)  # at most 2 of the 16 masked from the cluster
    assert capped.mask[0, 60:].sum() == 2
    order = mps_cube_scores(scores, (4, 4, 4), 2)
    cube = mask_from_scores(order, 8).mask.view(1, 2, 2, 2, 2, 2, 2)  # first 8 tokens: one whole cube
    assert cube.amax(dim=(2, 4, 6)).sum() == 1


@pytest.mark.parametrize("algorithm", ["kmeans", "agglomerative"])
def test_covariance_clustering_masks_lesion_patches_3x_as_often_as_random(algorithm: str):
    """Intensity descriptors (z-scored: their features have different units), the patch covariance
    and similarity matrices, the clustering of the similarity matrix, the rule; against random
    masking measured on the same phantoms."""
    torch.manual_seed(0)
    img, lab, _ = phantom_batch(24)
    patch, ratio, k = 4, 0.1, 4
    lesion = lesion_token_mask(lab, patch)
    z = standardize(patch_intensity_descriptors(img, patch))
    assign = cluster_similarity(patch_similarity(patch_covariance(z)), k, algorithm=algorithm)
    scores = lesion_scores(z, assign, k)
    factor = lesion_masking_factor(mps_masking(scores, ratio).mask, lesion, ratio)
    random = lesion_masking_factor(random_masking(*lesion.shape, ratio).mask, lesion, ratio)
    print(f"MPS ({algorithm}) lesion masking factor at ratio {ratio}: {factor:.2f}x, random {random:.2f}x")
    assert factor >= 3.0 and factor > 2.0 * random  # 3x random masking's expected rate (1.0x), measured 3.8x


@pytest.mark.parametrize("bad", [0.0, 1.0])
def test_ratio_validated(bad: float):
    with pytest.raises(ValueError, match=str(bad)):
        mps_masking(torch.rand(1, 8), bad)
