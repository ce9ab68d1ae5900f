"""On-the-fly augmentation of pretraining crops (MiM's settings: flips, 90-degree rotations,
intensity scale and shift), with MONAI's array transforms applied per sample.

Spatial transforms are skipped for batches that carry per-patch columns tied to the crop's
geometry (``lesion_prob``), which a flip would misalign.
"""

from __future__ import annotations

import torch
from monai.transforms import (
    Compose,
    RandFlip,
    RandRotate90,
    RandScaleIntensity,
    RandShiftIntensity,
)


def build_augment(seed: int, spatial: bool = True, shape: tuple[int, ...] | None = None) -> Compose:
    """``shape``: the crops' spatial shape; in-plane rotation is added only when it is square."""
    xforms = []
    if spatial:
        xforms += [RandFlip(prob=0.5, spatial_axis=a) for a in (0, 1, 2)]
        if shape is None or shape[0] == shape[1]:
            xforms.append(RandRotate90(prob=0.5, max_k=3, spatial_axes=(0, 1)))
    xforms += [RandScaleIntensity(factors=0.1, prob=0.5), RandShiftIntensity(offsets=0.1, prob=0.5)]
    aug = Compose(xforms)
    aug.set_random_state(seed=seed)
    return aug


def augment_batch(images: torch.Tensor, aug: Compose) -> torch.Tensor:
    """``images: [B, C, D, H, W]`` -> same shape, each sample augmented independently."""
    out = [torch.as_tensor(aug(img)) for img in images]
    return torch.stack([o.as_tensor() if hasattr(o, "as_tensor") else o for o in out]).contiguous()
