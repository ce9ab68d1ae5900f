"""MONAI dictionary preprocessing shared by ``raymim prepare`` and downstream fine-tuning.

:func:`build_preprocess` returns a ``Compose`` over ``"image"`` (and ``"label"``):

1. ``LoadImage`` through :class:`raymim.io.readers.VolumeReader` (NIfTI / NRRD / DICOM series,
   with validation), channel first;
2. ``Orientationd`` to ``cfg.orientation`` (RAS default), then a label/image grid check (same
   voxel grid, else the case is rejected: no silent misalignment); 3. ``Spacingd`` to ``cfg.spacing`` when
   set (bilinear for images, nearest for labels);
4. :class:`WindowIntensityd`: CT -> clip to ``cfg.ct_window`` HU and scale to [0, 1]; MR ->
   clip at ``cfg.mr_percentiles`` and scale to [0, 1]; ``auto`` picks CT when the image holds
   values below -500 (air in HU);
5. ``CropForegroundd`` (voxels above :data:`FOREGROUND` after scaling) and ``SpatialPadd`` to at
   least ``cfg.crop_size`` (pad value 0 = air / background).

Image and label go through the same spatial transforms, so they stay aligned.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImage,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from raymim.config import PrepareConfig
from raymim.data.crops import FOREGROUND, is_foreground  # noqa: F401 - re-exported; defined MONAI-free there
from raymim.io.checks import CaseRejected
from raymim.io.readers import VolumeReader


class WindowIntensityd(MapTransform):
    """Window and scale intensities to [0, 1] by modality; records the choice in ``data["modality"]``."""

    def __init__(self, keys: str, modality: str, ct_window: list[float], mr_percentiles: list[float]) -> None:
        super().__init__(keys)
        self.modality = modality
        self.ct = ScaleIntensityRanged(keys, a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0,
                                       clip=True)
        self.mr = _mr_scaler(keys, mr_percentiles)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = self.modality
        if modality == "auto":
            modality = "ct" if float(d[self.keys[0]].min()) < -500.0 else "mr"
        d["modality"] = modality
        return self.ct(d) if modality == "ct" else self.mr(d)


def _mr_scaler(keys: str, percentiles: list[float]) -> ScaleIntensityRangePercentilesd:
    """MONAI's percentile scaling to [0, 1] with clipping (MR has no absolute unit)."""
    return ScaleIntensityRangePercentilesd(keys, lower=percentiles[0], upper=percentiles[1], b_min=0.0,
                                           b_max=1.0, clip=True, relative=False)


class LoadVolumed(MapTransform):
    """``LoadImage`` with :class:`VolumeReader` only (``LoadImaged(reader=...)`` would fall back
    to MONAI's default readers when ours rejects a file, hiding the reason)."""

    def __init__(self, keys: str, validate: bool = True, max_voxels: int | None = None) -> None:
        super().__init__(keys)
        self.reader = VolumeReader(validate=validate) if max_voxels is None else \
            VolumeReader(validate=validate, max_voxels=max_voxels)
        # MONAI builds every default reader; the nvImageCodec one warns (a warning and a log line)
        # when its optional plugin is absent, though only VolumeReader is ever used here
        plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
        level = plugin_log.level
        plugin_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
                self.loader = LoadImage(image_only=True)
        finally:
            plugin_log.setLevel(level)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key], reader=self.reader)
        return d


class CheckGridd(MapTransform):
    """Reject a case whose label is not on the image's voxel grid (shape and affine, after
    reorientation: a label stored with flipped axes but covering the same grid is fine)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if "label" not in d:
            return d
        img, lab = d["image"], d["label"]
        if tuple(img.shape[1:]) != tuple(lab.shape[1:]):
            raise CaseRejected(f"label grid {tuple(lab.shape[1:])} differs from image grid {tuple(img.shape[1:])}")
        a, b = np.asarray(img.affine), np.asarray(lab.affine)
        tol = 0.5 * float(np.linalg.norm(a[:3, :3], axis=0).min())  # half a voxel
        if not np.allclose(a[:3], b[:3], atol=tol):
            raise CaseRejected("label does not cover the image's voxel grid (affines differ)")
        if float(lab.max()) > 255 or float(lab.min()) < 0:
            raise CaseRejected("label values outside 0..255")
        d["label"] = lab.round()
        return d


def build_preprocess(cfg: PrepareConfig, with_label: bool) -> Compose:
    """MONAI ``Compose`` of dictionary transforms: load, orient, resample, window, crop, pad.

    Example::

        pre = build_preprocess(PrepareConfig(spacing=[2, 2, 2]), with_label=True)
        out = pre({"image": "ct.nii.gz", "label": "seg.nii.gz"})  # MetaTensors [1, X, Y, Z]
    """
    keys = ["image", "label"] if with_label else ["image"]
    steps: list[Any] = [LoadVolumed("image", validate=True, max_voxels=cfg.max_voxels)]
    if with_label:
        steps.append(LoadVolumed("label", validate=False, max_voxels=cfg.max_voxels))
    steps += [
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        Orientationd(keys, axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        CheckGridd(keys),
    ]
    if cfg.spacing is not None:
        modes = ("bilinear", "nearest") if with_label else ("bilinear",)
        steps.append(Spacingd(keys, pixdim=tuple(cfg.spacing), mode=modes))
    steps.append(WindowIntensityd("image", cfg.modality, cfg.ct_window, cfg.mr_percentiles))
    if cfg.crop_foreground:
        steps.append(CropForegroundd(keys, source_key="image", select_fn=is_foreground, allow_smaller=True))
    steps.append(SpatialPadd(keys, spatial_size=tuple(int(s) for s in cfg.crop_size), mode="constant"))
    return Compose(steps, log_stats=False)


def voxel_spacing(img: torch.Tensor) -> list[float]:
    """Spacing (mm) of a MetaTensor's current affine, in array axis order."""
    affine = np.asarray(img.affine, dtype=np.float64)
    return [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
