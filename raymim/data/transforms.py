"""MONAI dictionary preprocessing shared by ``raymim prepare`` and downstream fine-tuning.

:func:`build_preprocess` returns a ``Compose`` over ``"image"`` (and ``"label"``):

1. ``LoadImage`` through :class:`raymim.io.readers.VolumeReader` (NIfTI / NRRD / DICOM series,
   with validation), channel first;
2. ``Orientationd`` to ``cfg.orientation`` (RAS default), then a label/image grid check (same
   voxel grid, else the case is rejected: no silent misalignment); 3. ``Spacingd`` to ``cfg.spacing`` when
   set (bilinear for images, nearest for labels), executed by :class:`SeparableSpacingd`;
4. :class:`WindowIntensityd`: CT -> clip to ``cfg.ct_window`` HU and scale to [0, 1]; MR ->
   clip at ``cfg.mr_percentiles`` and scale to [0, 1]; ``auto`` picks CT when the image holds
   values below -500 (air in HU);
5. ``CropForegroundd`` (voxels above :data:`FOREGROUND` after scaling) and ``SpatialPadd`` to at
   least ``cfg.crop_size`` (pad value 0 = air / background).

Image and label go through the same spatial transforms, so they stay aligned.

Deviation, for speed (issue #18): MONAI's ``Spacingd`` resamples with ``grid_sample`` over a full
3D sampling grid, 60-70 % of a CT's preprocessing time on one thread. ``Spacingd`` keeps the
input's direction cosines (``diagonal=False``), so the map from output to input voxels is a
per-axis scale and shift even for an oblique scan, and trilinear interpolation is then the
product of three 1D linear interpolations: :class:`SeparableSpacingd` lets MONAI's ``Spacing``
compute the output grid (lazily: its affine and shape, nothing resampled) and runs those three 1D
passes, ~8x less work, on the same sample positions with the same border handling
(``padding_mode`` "border": positions clamped to the input). The output equals ``Spacingd``'s up
to float32 rounding (tests/data/test_transforms_speed.py). Labels (nearest neighbour:
``grid_sample`` breaks the exact ties of a 2:1 grid by its own float rounding) and a voxel map
that is not per-axis go through MONAI's ``Spacing`` itself. No inverse is recorded (nothing
inverts prepare's preprocessing).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImage,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacing,
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


# Off-diagonal terms of the voxel-to-voxel map below this are rounding, not a rotation.
_AXIS_TOL = 1e-6
_BAND = 64  # output positions per interpolation matrix along the last axis


def _resample_axis(x: torch.Tensor, axis: int, scale: float, shift: float, n_out: int) -> torch.Tensor:
    """``x`` linearly interpolated along ``axis`` at positions ``scale * i + shift`` (i < ``n_out``),
    clamped to the input (``grid_sample``'s "border"). Along the last (contiguous) axis, where a
    gather is slow, as products with banded interpolation matrices (two weights per column)."""
    n = x.shape[axis]
    pos = (torch.arange(n_out, dtype=torch.float64) * scale + shift).clamp_(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_(max=n - 1)
    weight = (pos - lo).to(x.dtype)
    if axis != x.ndim - 1:
        view = [1] * x.ndim
        view[axis] = n_out
        return torch.lerp(x.index_select(axis, lo), x.index_select(axis, hi), weight.view(view))
    flat = x.reshape(-1, n)
    parts = []
    for j0 in range(0, n_out, _BAND):  # positions increase with i: each band reads a narrow input window
        j1 = min(n_out, j0 + _BAND)
        a, b = int(lo[j0]), int(hi[j1 - 1]) + 1
        mat = torch.zeros(b - a, j1 - j0, dtype=x.dtype)
        cols = torch.arange(j1 - j0)
        mat.index_put_((lo[j0:j1] - a, cols), 1 - weight[j0:j1], accumulate=True)
        mat.index_put_((hi[j0:j1] - a, cols), weight[j0:j1], accumulate=True)
        parts.append(flat[:, a:b] @ mat)
    return torch.cat(parts, 1).reshape(*x.shape[:-1], n_out)


class SeparableSpacingd(MapTransform):
    """MONAI ``Spacingd`` (``pixdim``, per-key ``mode`` "bilinear" / "nearest", default
    ``padding_mode`` "border" and ``align_corners=False``), a bilinear key whose output-to-input
    voxel map is per-axis executed as three 1D passes; see the module docstring."""

    def __init__(self, keys: list[str], pixdim: tuple[float, ...], mode: tuple[str, ...]) -> None:
        super().__init__(keys)
        self.modes = dict(zip(self.keys, mode))
        self.geometry = Spacing(pixdim=pixdim, lazy=True)  # the output grid only, nothing resampled
        self.fallback = {k: Spacing(pixdim=pixdim, mode=m) for k, m in self.modes.items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            planned = self.geometry(img)
            dst = np.asarray(planned.peek_pending_affine(), dtype=np.float64)
            shape = [int(s) for s in planned.peek_pending_shape()]
            src = np.asarray(img.affine, dtype=np.float64)
            xform = np.linalg.solve(src, dst)  # output voxel -> input voxel
            lin = xform[:3, :3]
            if self.modes[key] == "nearest" or np.diag(lin).min() <= 0 or \
                    np.abs(lin - np.diag(np.diag(lin))).max() > _AXIS_TOL * np.abs(lin).max():
                d[key] = self.fallback[key](img)
                continue
            x = img.as_tensor().to(torch.float32)
            # shrinking axes first: the later passes run on fewer voxels
            for axis in sorted(range(3), key=lambda a: shape[a] / img.shape[a + 1]):
                x = _resample_axis(x, axis + 1, float(lin[axis, axis]), float(xform[axis, 3]), shape[axis])
            meta = {k: v for k, v in img.meta.items() if k != "affine"}  # the new affine is passed on its own
            d[key] = MetaTensor(x.contiguous(), affine=torch.as_tensor(dst), meta=meta)
        return d


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
        steps.append(SeparableSpacingd(keys, pixdim=tuple(cfg.spacing), mode=modes))
    steps.append(WindowIntensityd("image", cfg.modality, cfg.ct_window, cfg.mr_percentiles))
    if cfg.crop_foreground:
        steps.append(CropForegroundd(keys, source_key="image", select_fn=is_foreground, allow_smaller=True))
    steps.append(SpatialPadd(keys, spatial_size=tuple(int(s) for s in cfg.crop_size), mode="constant"))
    return Compose(steps, log_stats=False)


def voxel_spacing(img: torch.Tensor) -> list[float]:
    """Spacing (mm) of a MetaTensor's current affine, in array axis order."""
    affine = np.asarray(img.affine, dtype=np.float64)
    return [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
