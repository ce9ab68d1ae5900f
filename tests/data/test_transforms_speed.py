"""SeparableSpacingd (prepare's resampling) against MONAI's Spacingd, which it replaces for speed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd

from raymim.data.transforms import SeparableSpacingd


def _volume(shape, spacing, seed=0, rotate=0.0):
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.normal(0, 300, (1, *shape)).astype(np.float32))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-12.3, 40.1, 7.7]
    if rotate:
        c, s = np.cos(rotate), np.sin(rotate)
        affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    return MetaTensor(x, affine=torch.as_tensor(affine))


@pytest.mark.parametrize("shape, spacing, target", [
    ((70, 64, 13), (0.8, 0.8, 5.0), (1.5, 1.5, 2.0)),    # CT: shrink in-plane, grow across slices
    ((30, 25, 28), (3.0, 3.0, 3.0), (1.5, 1.5, 2.0)),    # 2:1 upsampling (sample positions on half voxels)
    ((40, 41, 200), (1.5, 1.5, 0.7), (1.5, 1.5, 2.0)),   # one axis unchanged; a long last axis (several bands)
])
def test_matches_monai_spacingd(shape, spacing, target):
    img = _volume(shape, spacing)
    ref = Spacingd("image", pixdim=target, mode="bilinear")({"image": img})["image"]
    out = SeparableSpacingd(["image"], pixdim=target, mode=("bilinear",))({"image": img})["image"]
    assert tuple(out.shape) == tuple(ref.shape)
    np.testing.assert_allclose(np.asarray(out.affine), np.asarray(ref.affine), atol=1e-9)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=2e-3)  # HU-scale values: float32 rounding
    assert not img.pending_operations  # the lazy geometry pass leaves its input alone


def test_oblique_scan_and_labels():
    target = (1.5, 1.5, 2.0)
    oblique = _volume((30, 25, 12), (1.0, 1.0, 3.0), rotate=0.3)  # the output grid keeps its direction
    lab = _volume((30, 25, 28), (3.0, 3.0, 3.0)).round().clamp(0, 3)
    lab = MetaTensor(lab.as_tensor()[:, :, :, :12], affine=oblique.affine)
    out = SeparableSpacingd(["image", "label"], pixdim=target, mode=("bilinear", "nearest"))(
        {"image": oblique, "label": lab})
    ref = Spacingd(["image", "label"], pixdim=target, mode=("bilinear", "nearest"))({"image": oblique, "label": lab})
    np.testing.assert_allclose(np.asarray(out["image"].affine), np.asarray(ref["image"].affine), atol=1e-9)
    np.testing.assert_allclose(out["image"].numpy(), ref["image"].numpy(), atol=2e-3)
    assert torch.equal(out["label"].as_tensor(), ref["label"].as_tensor())  # nearest: MONAI's own resampling
