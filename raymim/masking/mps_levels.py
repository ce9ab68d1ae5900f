"""MiM levels whose level-1 cubes are chosen by masked patch selection (MPS).

Same hierarchy as :func:`raymim.masking.multilevel.mim_levels` (Zhuang et al., MiM), with one
change: the level-1 masking cubes are ordered by a lesion score (lesion cubes first, see
:func:`raymim.masking.selection.mps_cube_scores`) instead of uniformly, so the finer levels,
which are drawn from *masked* level-1 cubes, re-see lesion regions at a higher resolution.
Deeper levels keep MiM's random masking.

Example::

    >>> levels = mps_mim_levels(img, 32, 8, [384, 96], 0.6, 2, levels=2,
    ...                         score_fn=lambda vols: torch.rand(vols.shape[0], 64))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from raymim.masking.multilevel import MiMLevel, mim_levels
from raymim.masking.selection import mps_cube_scores
from raymim.masking.tokens import mask_from_scores, num_masked


def mps_mim_levels(
    image: torch.Tensor,
    img_size: int,
    patch_size: int,
    level_sizes: Sequence[int],
    mask_ratio: float,
    gamma: int,
    levels: int,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    mask_block: int = 1,
    share: float = 1.0,
    threshold: float = 0.5,
    *,
    generator: torch.Generator | None = None,
) -> list[MiMLevel]:
    """MiM levels for ``image`` [B, C, D, H, W]; ``score_fn(level-1 volumes) -> [B, L]`` lesion scores."""
    grid = img_size // patch_size
    n_mask = num_masked(grid**3, mask_ratio)

    def level1_mask(volumes: torch.Tensor, block: int):
        order = mps_cube_scores(score_fn(volumes), (grid,) * 3, block, share, threshold, generator=generator)
        return mask_from_scores(order, n_mask)

    return mim_levels(image, img_size, patch_size, level_sizes, mask_ratio, gamma, levels, mask_block,
                      generator=generator, level1_mask=level1_mask)


__all__ = ["mps_mim_levels"]
