"""MPS prior mode: blobness, scikit-learn clustering, the per-volume lesion_prob column end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymim.config import PrepareConfig, RaymimConfig, TrainConfig
from raymim.data.patch_stats import (
    PriorModel,
    blobness,
    cluster_patches,
    fit_prior,
    lesion_prob,
    patch_descriptors,
    sym3_eigvalsh,
)
from raymim.masking.selection import lesion_token_mask, mps_masking
from tests.methods.phantoms import lesion_masking_factor, phantom_batch


def test_closed_form_eigenvalues_match_numpy_including_degenerate_matrices():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(2000, 3, 3))
    m = m + np.swapaxes(m, 1, 2)
    m[:10] = 2.5 * np.eye(3)  # triple eigenvalue (the deviatoric part is 0)
    m[10:20] = np.diag([1.0, 1.0, -3.0])  # a double one
    m[20:30] = 0.0
    m[30:40] *= 1e-6  # tiny, like a flat region's Hessian
    lam = sym3_eigvalsh(m[:, 0, 0], m[:, 1, 1], m[:, 2, 2], m[:, 0, 1], m[:, 0, 2], m[:, 1, 2])
    ref = np.linalg.eigvalsh(m)
    assert lam.shape == (2000, 3)
    np.testing.assert_allclose(lam, ref, atol=1e-9 * np.abs(ref).max(), rtol=1e-7)
    assert np.all(np.diff(lam, axis=-1) >= -1e-12)  # ascending, like eigvalsh


def test_blobness_prefers_blobs_to_edges_and_tubes():
    z, y, x = np.meshgrid(*(np.arange(32.0),) * 3, indexing="ij")
    sphere = (((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2) <= 3**2).astype(np.float32)
    tube = (((y - 16) ** 2 + (x - 16) ** 2) <= 3**2).astype(np.float32)
    plane = (x >= 16).astype(np.float32)
    peak = {name: float(blobness(v, 2.0)[8:24, 8:24, 8:24].max()) for name, v in
            (("sphere", sphere), ("tube", tube), ("plane", plane))}
    assert peak["sphere"] > 3 * peak["tube"] and peak["sphere"] > 3 * peak["plane"], peak


@pytest.mark.parametrize("algorithm", ["kmeans", "agglomerative", "dbscan"])
@pytest.mark.parametrize("scope", ["population", "volume"])
def test_every_algorithm_gives_a_grid_with_a_lesion_cluster(algorithm: str, scope: str):
    img, _, _ = phantom_batch(3, size=32, seed=3)
    cfg = PrepareConfig(crop_size=[32, 32, 32], lesion_prior=True, prior_patch=4, prior_algorithm=algorithm,
                        prior_scope=scope)
    crops = [v[0].numpy() for v in img]
    model = fit_prior(np.concatenate([patch_descriptors(c, 4) for c in crops]), cfg) if scope == "population" else None
    grids = np.stack([lesion_prob(c, cfg, model) for c in crops])
    assert grids.shape == (3, 8, 8, 8) and grids.dtype == np.float32
    assert 0.0 <= grids.min() and grids.max() <= 1.0
    share = float((grids >= 0.5).mean())  # the lesion cluster: a minority of the patches
    assert 0.0 < share < 0.5, share
    if scope == "population":  # about 1 - prior_quantile of the fit patches
        assert share == pytest.approx(1 - cfg.prior_quantile, abs=0.03)
        again = PriorModel.from_dict(model.to_dict())  # the JSON round trip scores the same
        np.testing.assert_allclose(lesion_prob(crops[0], cfg, again), grids[0], rtol=1e-5)


def test_config_and_fit_errors_are_clear():
    with pytest.raises(ValueError, match="spectral"):
        cluster_patches(np.zeros((8, 2)), "spectral", 2)
    with pytest.raises(ValueError, match="prior_patch"):
        PrepareConfig(crop_size=[30, 32, 32], lesion_prior=True, prior_patch=8)
    with pytest.raises(ValueError, match="prior_scope"):
        PrepareConfig(prior_scope="global")
    with pytest.raises(ValueError, match="prior_quantile"):
        PrepareConfig(prior_quantile=1.0)
    assert PrepareConfig().prior_clusters == 32 and PrepareConfig(prior_scope="volume").prior_clusters == 4
    cfg = PrepareConfig(crop_size=[32, 32, 32], lesion_prior=True)
    with pytest.raises(ValueError, match="at least 64 patches"):
        fit_prior(np.zeros((10, 7), np.float32), cfg)
    with pytest.raises(ValueError, match="fitted prior model"):
        lesion_prob(np.zeros((32, 32, 32), np.float32), cfg)


@pytest.mark.slow
def test_prior_masks_lesion_patches_at_least_3x_as_often_as_random():
    """24 phantoms at 64^3 (lesions 2-8 voxels across), 8^3 patches, mask ratio 0.1 (at most 10x)."""
    img, lab, _ = phantom_batch(24, size=64, seed=0)
    crops = [v[0].numpy() for v in img]
    cfg = PrepareConfig(crop_size=[64, 64, 64], lesion_prior=True, prior_patch=8)
    model = fit_prior(np.concatenate([patch_descriptors(c, 8) for c in crops]), cfg)
    scores = torch.stack([torch.from_numpy(lesion_prob(c, cfg, model)).flatten() for c in crops])
    lesion = lesion_token_mask(lab, 8)
    torch.manual_seed(0)
    factor = lesion_masking_factor(mps_masking(scores, 0.1).mask, lesion, 0.1)
    torch.manual_seed(0)
    rand = lesion_masking_factor(mps_masking(torch.rand_like(scores), 0.1, threshold=1.0).mask, lesion, 0.1)
    print(f"MPS prior (population k-means) lesion masking factor at ratio 0.1: {factor:.2f}x, random {rand:.2f}x")
    # Issue target 3x with margin; measured 6.94x on this set (random 0.65x), 4.0-7.4x across phantom seeds
    # (bench/RESULTS.md "MPS lesion masking").
    assert factor >= 3.0 and rand < 2.0


@pytest.mark.slow
@pytest.mark.ray
def test_prepare_writes_lesion_prob_and_training_batches_carry_it(ray_session, phantoms, tmp_path, monkeypatch):
    from raymim.data.pipeline import prepare
    from raymim.data.shards import read_volume, volume_index
    from raymim.data.stream import crop_stream
    from raymim.methods import build_method
    from raymim.train.loop import BatchCollate
    from raymim.train.trainer import build_dataset
    from tests.methods.conftest import tiny_config

    monkeypatch.setenv("RAYMIM_DEID_KEY", "test-key")
    cfg = PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=2, lesion_prior=True, prior_patch=4)
    out = tmp_path / "prior"
    summary = prepare(phantoms, out, cfg, progress=False)
    assert summary["exit_code"] == 0 and summary["volumes"] == 6
    grids = []
    for v in volume_index(out):
        vol = read_volume(v["file"], v["row_group"])
        # one prior grid per volume, tiling it exactly (volumes padded to multiples of the patch)
        assert all(s % 4 == 0 for s in vol["image"].shape)
        assert vol["lesion_prob"].shape == tuple(s // 4 for s in vol["image"].shape)
        grids.append(vol["lesion_prob"].ravel())
    grids = np.concatenate(grids)
    assert 0.0 <= grids.min() and grids.max() < 1.0
    assert 0.0 < (grids >= 0.5).mean() < 0.5  # a lesion cluster in the population's tail
    model_file = out / "prior_model.json"
    saved = model_file.read_text()
    assert "case" not in saved and "source" not in saved  # aggregate numbers only
    again = prepare(phantoms, out, cfg, progress=False)  # resume: nothing redone, same model
    assert again["skipped"] == 6 and model_file.read_text() == saved

    spec, _ = build_dataset(str(out), RaymimConfig(prepare=cfg, train=TrainConfig(steps=2)))  # the trainer's reader
    batch = next(iter(crop_stream(spec, 0).iter_torch_batches(batch_size=2, collate_fn=BatchCollate())))
    assert tuple(batch["lesion_prob"].shape) == (2, 4, 4, 4)
    method = build_method("mps_ams", tiny_config("mps_ams", levels=1, mask_ratio=0.25, mps_mode="prior"))
    out_m = method(batch)
    assert out_m.metrics["mps_prior_missing"] == 0.0 and out_m.metrics["mps_masked_lesion_share"] > 0
