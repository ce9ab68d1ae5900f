"""Readers and preprocessing on the real scans of ../shared/data (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import LoadImage

from raymim.config import PrepareConfig
from raymim.data.transforms import build_preprocess
from raymim.io.readers import VolumeReader

TS = "totalsegmentator"


def _load(path):
    return LoadImage(reader=VolumeReader(), image_only=True)(str(path))


def _hu(cfg: PrepareConfig, x: np.ndarray) -> np.ndarray:
    lo, hi = cfg.ct_window
    return x * (hi - lo) + lo


def test_nifti_reader(shared_data):
    img = _load(shared_data / TS / "example_ct.nii.gz")
    assert tuple(img.shape) == (122, 101, 112)
    assert np.allclose(np.diag(img.affine.numpy())[:3], [3, 3, 3])
    assert -1300 < float(img.min()) < -900


def test_nrrd_reader_lps_to_ras(shared_data):
    img = _load(shared_data / "slicerio" / "CTChest4.nrrd")
    assert tuple(img.shape) == (128, 128, 34)
    # NRRD space is LPS with negative directions -> RAS affine with positive diagonal.
    assert np.allclose(np.diag(img.affine.numpy())[:3], [3.046876, 3.046876, 10.0], atol=1e-3)


def test_dicom_series_jpeg2000(shared_data):
    img = _load(shared_data / TS / "example_ct_dicom")
    assert tuple(img.shape) == (512, 512, 20)
    assert float(img.min()) <= -1000 and float(img.max()) > 500  # rescale intercept applied (HU)
    spacing = np.linalg.norm(img.affine.numpy()[:3, :3], axis=0)
    assert np.allclose(spacing, [0.9765625, 0.9765625, 2.0])


@pytest.mark.parametrize(
    "image,label,checks",
    [
        # slicerio: 5 right lung, 6 left lung (NRRD, LPS on disk)
        ("slicerio/CTChest4.nrrd", "slicerio/Segmentation.seg.nrrd", {5: (-950, -600), 6: (-950, -600)}),
        # TotalSegmentator v2 map: 11 / 14 lower lung lobes (NIfTI, RAS)
        (f"{TS}/example_ct.nii.gz", f"{TS}/example_seg_fast_force_split.nii.gz", {11: (-950, -600), 14: (-950, -600)}),
        # DICOM series (LPS) with a NIfTI label stored flipped (LAS): 5 liver, 69/70 humeri
        (f"{TS}/example_ct_dicom", f"{TS}/example_seg_dicom.nii.gz", {5: (40, 150), 69: (300, 1000), 70: (300, 1000)}),
    ],
)
def test_image_label_alignment(shared_data, image, label, checks):
    cfg = PrepareConfig(crop_foreground=True, crop_size=[16, 16, 16])
    out = build_preprocess(cfg, with_label=True)({"image": str(shared_data / image), "label": str(shared_data / label)})
    x, lab = _hu(cfg, out["image"][0].numpy()), out["label"][0].numpy()
    assert x.shape == lab.shape and out["modality"] == "ct"
    assert np.allclose(out["image"].affine.numpy(), out["label"].affine.numpy())
    for value, (lo, hi) in checks.items():
        assert lo < float(x[lab == value].mean()) < hi, value


def test_left_right_after_reorientation(shared_data):
    cfg = PrepareConfig(crop_size=[16, 16, 16])
    out = build_preprocess(cfg, True)({"image": str(shared_data / "slicerio/CTChest4.nrrd"),
                                       "label": str(shared_data / "slicerio/Segmentation.seg.nrrd")})
    lab = out["label"][0].numpy()
    # RAS: the first axis grows towards the patient's right, so the right lung (5) has larger x.
    assert np.argwhere(lab == 5)[:, 0].mean() > np.argwhere(lab == 6)[:, 0].mean()


def test_spacing_and_window(shared_data):
    cfg = PrepareConfig(spacing=[6.0, 6.0, 10.0], ct_window=[-1000, 400], crop_foreground=False,
                        crop_size=[16, 16, 16])
    out = build_preprocess(cfg, False)({"image": str(shared_data / "slicerio/CTChest4.nrrd")})
    img = out["image"]
    assert np.allclose(np.linalg.norm(img.affine.numpy()[:3, :3], axis=0), [6, 6, 10])
    assert abs(img.shape[1] - 65) <= 1 and img.shape[3] == 34
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0


def test_lps_full_size_ct(shared_data):
    cfg = PrepareConfig(crop_size=[16, 16, 16])
    out = build_preprocess(cfg, False)({"image": str(shared_data / "crlm/CRLM-CT-1004_ct.nii.gz")})
    aff = out["image"].affine.numpy()
    assert (np.diag(aff)[:3] > 0).all()  # reoriented to RAS
    assert out["image"].shape[1] < 512  # foreground crop removed the -3024 ring / air


def test_mr_percentile_scaling(shared_data):
    cfg = PrepareConfig(crop_size=[16, 16, 16])
    out = build_preprocess(cfg, False)({"image": str(shared_data / f"{TS}/example_mr_sm.nii.gz")})
    assert out["modality"] == "mr"
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
