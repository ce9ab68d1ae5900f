"""On-the-fly augmentation of pretraining crops (MiM's settings: flips, 90-degree rotations,
intensity scale and shift), with MONAI's dictionary transforms applied per sample.

Spatial transforms move every spatial key of a sample together: the image, its ``label``
crop and its MPS ``lesion_prob`` grid (a ``[D/p, H/p, W/p]`` patch grid of an origin-aligned
crop: flipping or rotating the crop by whole voxels flips or rotates its patch grid the same
way, so the prior stays on the patches it scores). MONAI's dictionary transforms draw their
random parameters once per call and apply them to every key, which is what keeps them aligned.
Intensity transforms touch the image only.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms import (
    Compose,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

SPATIAL_KEYS = ("image", "label", "lesion_prob")


def build_augment(seed: int, spatial: bool = True, shape: tuple[int, ...] | None = None) -> Compose:
    """``shape``: the crops' spatial shape; in-plane rotation is added only when it is square."""
    keys = list(SPATIAL_KEYS)
    xforms: list[Any] = []
    if spatial:
        xforms += [RandFlipd(keys, prob=0.5, spatial_axis=a, allow_missing_keys=True) for a in (0, 1, 2)]
        if shape is None or shape[0] == shape[1]:
            xforms.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1), allow_missing_keys=True))
    xforms += [RandScaleIntensityd("image", factors=0.1, prob=0.5), RandShiftIntensityd("image", offsets=0.1, prob=0.5)]
    aug = Compose(xforms)
    aug.set_random_state(seed=seed)
    return aug


def _plain(x: Any) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def augment_batch(batch: dict[str, Any], aug: Compose) -> dict[str, Any]:
    """``batch["image"]: [B, C, D, H, W]`` (and ``label`` [B, D, H, W], ``lesion_prob``
    [B, d, h, w] when present) -> the same batch, each sample augmented independently and its
    spatial keys moved together."""
    present = [k for k in SPATIAL_KEYS if torch.is_tensor(batch.get(k))]
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in present}
    for b in range(batch["image"].shape[0]):
        sample = {k: batch[k][b] if k == "image" else batch[k][b].unsqueeze(0) for k in present}
        res = aug(sample)
        for k in present:
            v = _plain(res[k])
            outs[k].append(v if k == "image" else v[0])
    out = dict(batch)
    for k in present:
        out[k] = torch.stack(outs[k]).contiguous()
    return out
