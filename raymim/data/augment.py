"""Pretraining augmentation of each crop, inside the crop stream's Ray Data tasks (CPUs, any node).

What is drawn (MiM's / MONAI's pretraining settings, in MONAI's order and with MONAI's
parameter distributions): ``RandFlipd`` on each spatial axis (p 0.5 each), ``RandRotate90d`` in
the (0, 1) plane (p 0.5, k uniform in 1..3; only when the crop is square in that plane),
``RandScaleIntensityd`` (``x * (1 + f)``, f ~ U(-0.1, 0.1), p 0.5) and ``RandShiftIntensityd``
(``x + o``, o ~ U(-0.1, 0.1), p 0.5).

Spatial transforms move every spatial key of a crop together: ``image``, ``label`` and the MPS
``lesion_prob`` grid (a ``[D/p, H/p, W/p]`` patch grid of an origin-aligned crop: flipping or
rotating the crop by whole voxels flips or rotates its patch grid the same way, so the prior
stays on the patches it scores). Intensity transforms touch the image only.

**Seeding.** Crop ``i`` of a volume in pass ``p`` draws its parameters from
``numpy.random.default_rng([run seed, p + 1, case key, AUGMENT_STREAM, i])``
(:func:`augment_rng`): they depend on (run seed, pass, case id, crop index) only, never on the
worker, node or timing, so a resumed run redraws the exact augmentations of its pass, as it
redraws the crops (:mod:`raymim.data.crops`). The probe's crops are not augmented.

Deviation, on purpose: the transforms are written here in numpy rather than composed from
MONAI's dictionary transforms (whose semantics they follow; tests compare them with MONAI's
``Flip`` / ``Rotate90`` / ``ScaleIntensity`` / ``ShiftIntensity``). The reader's Ray Data tasks
never import MONAI (11 s per worker process, see :mod:`raymim.data.crops`), flips and rotations
are numpy views that the batch's one stacking copy materialises, and the intensity step is a
float32 multiply-add through a table of the 65536 float16 values (exact, one gather per crop).
Measured against MONAI's per-sample path in bench/results/augment_in_ray_data_2026-12-01.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raymim.data.crops import case_key

SPATIAL_KEYS = ("image", "label", "lesion_prob")
# Fourth seed word of the augmentation generators (the crop generators have three words).
AUGMENT_STREAM = 0xA06

__all__ = ["AUGMENT_STREAM", "SPATIAL_KEYS", "Augmentation", "apply_augmentation", "augment_crops", "augment_rng",
           "draw_augmentation"]


@dataclass(frozen=True)
class Augmentation:
    """The parameters drawn for one crop: axes flipped, quarter turns in the (0, 1) plane, and
    the intensity map ``x * scale + shift`` (1 and 0 when not drawn)."""

    flips: tuple[int, ...] = ()
    rot90: int = 0
    scale: float = 1.0
    shift: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"flips": list(self.flips), "rot90": self.rot90, "scale": round(self.scale, 4),
                "shift": round(self.shift, 4)}


def augment_rng(seed: int, pass_index: int, case_id: str, index: int) -> np.random.Generator:
    """The generator of crop ``index``'s augmentation of ``case_id`` in pass ``pass_index``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(pass_index) + 1, case_key(case_id), AUGMENT_STREAM,
                                  int(index)])


def draw_augmentation(rng: np.random.Generator, shape: tuple[int, ...], spatial: bool = True) -> Augmentation:
    """One crop's parameters (MONAI's probabilities and ranges, module docstring). Every draw is
    made whether or not it is used, so the stream of draws does not depend on earlier outcomes."""
    u = rng.random(7)
    k = int(rng.integers(1, 4))
    f, o = rng.uniform(-0.1, 0.1, 2)
    flips = tuple(a for a in range(3) if spatial and u[a] < 0.5)
    rot = k if spatial and shape[0] == shape[1] and u[3] < 0.5 else 0
    return Augmentation(flips, rot, 1.0 + float(f) if u[4] < 0.5 else 1.0, float(o) if u[5] < 0.5 else 0.0)


def apply_augmentation(row: dict[str, Any], aug: Augmentation) -> dict[str, Any]:
    """``row`` with ``aug`` applied to its spatial keys (``image`` [D, H, W] and, when present,
    ``label`` / ``lesion_prob``) and the intensity map to its image. Flips and rotations are
    numpy views; the intensity map writes a new array of the image's dtype."""
    out = dict(row)
    for key in SPATIAL_KEYS:
        a = out.get(key)
        if a is None:
            continue
        if aug.flips:
            a = np.flip(a, axis=aug.flips)
        if aug.rot90:
            a = np.rot90(a, aug.rot90, axes=(0, 1))
        out[key] = a
    if aug.scale != 1.0 or aug.shift != 0.0:
        out["image"] = _intensity(out["image"], np.float32(aug.scale), np.float32(aug.shift))
    return out


_HALF_CODES = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _intensity(img: np.ndarray, scale: np.float32, shift: np.float32) -> np.ndarray:
    """``img * scale + shift`` in float32, returned in ``img``'s dtype. A float16 image is
    mapped through a 65536-entry table of every float16 value (the same float32 arithmetic and
    rounding, exactly; about 2x faster than converting the crop to float32 and back)."""
    if img.dtype == np.float16:
        with np.errstate(invalid="ignore", over="ignore"):
            table = (_HALF_CODES * scale + shift).astype(np.float16)
        return table[img.view(np.uint16)]
    return (img.astype(np.float32) * scale + shift).astype(img.dtype, copy=False)


def augment_crops(rows: list[dict[str, Any]], seed: int, pass_index: int, spatial: bool = True,
                  record: bool = False) -> list[dict[str, Any]]:
    """The K crop rows of one volume (:func:`raymim.data.crops.sample_crops`, in their order)
    augmented, crop ``i`` with :func:`augment_rng` ``(seed, pass, case id, i)``; ``record`` adds
    the drawn parameters to each row (``augment``: :meth:`Augmentation.to_dict`)."""
    out = []
    for i, row in enumerate(rows):
        aug = draw_augmentation(augment_rng(seed, pass_index, str(row["case_id"]), i), row["image"].shape, spatial)
        out.append(apply_augmentation(row, aug))
        if record:
            out[-1]["augment"] = aug.to_dict()
    return out
