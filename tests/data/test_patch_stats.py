"""MPS prior mode: blobness, scikit-learn clustering, the lesion_prob shard column end to end."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raymim.config import PrepareConfig, RaymimConfig, TrainConfig
from raymim.data.patch_stats import blobness, cluster_patches, lesion_prob
from raymim.masking.selection import lesion_token_mask, mps_masking
from tests.methods.phantoms import lesion_masking_factor, phantom_batch


def test_blobness_prefers_blobs_to_edges_and_tubes():
    z, y, x = np.meshgrid(*(np.arange(32.0),) * 3, indexing="ij")
    sphere = (((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2) <= 3**2).astype(np.float32)
    tube = (((y - 16) ** 2 + (x - 16) ** 2) <= 3**2).astype(np.float32)
    plane = (x >= 16).astype(np.float32)
    peak = {name: float(blobness(v, 2.0)[8:24, 8:24, 8:24].max()) for name, v in
            (("sphere", sphere), ("tube", tube), ("plane", plane))}
    assert peak["sphere"] > 3 * peak["tube"] and peak["sphere"] > 3 * peak["plane"], peak


@pytest.mark.parametrize("algorithm", ["kmeans", "agglomerative", "dbscan"])
def test_every_algorithm_gives_a_grid_with_a_lesion_cluster(algorithm: str):
    img, _, _ = phantom_batch(1, size=32, seed=3)
    cfg = PrepareConfig(crop_size=[32, 32, 32], lesion_prior=True, prior_patch=4, prior_algorithm=algorithm)
    grid = lesion_prob(img[0, 0].numpy(), cfg)
    assert grid.shape == (8, 8, 8) and grid.dtype == np.float32
    assert 0.0 <= grid.min() and grid.max() == pytest.approx(1.0) and (grid >= 0.5).sum() < grid.size


def test_cluster_patches_validates_the_algorithm():
    with pytest.raises(ValueError, match="spectral"):
        cluster_patches(np.zeros((8, 2)), "spectral", 2)
    with pytest.raises(ValueError, match="prior_patch"):
        PrepareConfig(crop_size=[30, 32, 32], lesion_prior=True, prior_patch=8)


@pytest.mark.slow
def test_prior_masks_lesion_patches_more_often_than_random():
    """24 phantoms at 64^3 (lesions 2-8 voxels across), 8^3 patches, mask ratio 0.1."""
    img, lab, _ = phantom_batch(24, size=64, seed=0)
    cfg = PrepareConfig(crop_size=[64, 64, 64], lesion_prior=True, prior_patch=8)
    scores = torch.stack([torch.from_numpy(lesion_prob(v[0].numpy(), cfg)).flatten() for v in img])
    lesion = lesion_token_mask(lab, 8)
    torch.manual_seed(0)
    factor = lesion_masking_factor(mps_masking(scores, 0.1).mask, lesion, 0.1)
    print(f"MPS prior (k-means, intensity + blobness) lesion masking factor vs random at ratio 0.1: {factor:.2f}x")
    # Issue target 3x: measured 3.5-4x on this set, 2.7-5x across phantom seeds (see bench/RESULTS.md).
    assert factor >= 2.0


@pytest.mark.slow
@pytest.mark.ray
def test_prepare_writes_lesion_prob_and_training_batches_carry_it(ray_session, phantoms, tmp_path, monkeypatch):
    from raymim.data.pipeline import prepare
    from raymim.methods import build_method
    from raymim.train.loop import BatchCollate
    from raymim.train.trainer import build_dataset
    from tests.methods.conftest import tiny_config

    monkeypatch.setenv("RAYMIM_DEID_KEY", "test-key")
    cfg = PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=2, lesion_prior=True, prior_patch=4)
    out = tmp_path / "prior"
    summary = prepare(phantoms, out, cfg, progress=False)
    assert summary["exit_code"] == 0 and summary["crops"] == 12
    t = pq.read_table(next((out / "shards").glob("*.parquet")))
    assert t.schema.field("lesion_prob").type.shape == [4, 4, 4]
    grids = t["lesion_prob"].combine_chunks().to_numpy_ndarray()
    assert grids.shape[1:] == (4, 4, 4) and np.all(grids.max(axis=(1, 2, 3)) > 0.99)

    ds, _ = build_dataset(str(out), RaymimConfig(train=TrainConfig(steps=2)))  # the trainer's reader
    batch = next(iter(ds.iter_torch_batches(batch_size=2, collate_fn=BatchCollate())))
    assert tuple(batch["lesion_prob"].shape) == (2, 4, 4, 4)
    method = build_method("mps_ams", tiny_config("mps_ams", levels=1, mask_ratio=0.25, mps_mode="prior"))
    out_m = method(batch)
    assert out_m.metrics["mps_prior_missing"] == 0.0 and out_m.metrics["mps_masked_lesion_share"] > 0
