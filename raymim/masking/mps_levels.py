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

from raymim.masking.multilevel import (
    MiMLevel,
    _randint,
    _sample_children,
    crop_resize,
    cube_block,
    level_box_sides,
)
from raymim.masking.selection import mps_cube_scores
from raymim.masking.tokens import block_masking, mask_from_scores, num_masked


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
    if img_size % patch_size:
        raise ValueError(f"img_size should be a multiple of patch_size={patch_size}, got {img_size}.")
    batch = image.shape[0]
    grid = img_size // patch_size
    sides = level_box_sides(image.shape[2:], level_sizes, levels)
    boxes = torch.zeros(batch, 1, 6, dtype=torch.long)
    for b in range(batch):
        start = [_randint(int(dim) - sides[0] + 1, generator) for dim in image.shape[2:]]
        boxes[b, 0] = torch.tensor(start + [s + sides[0] for s in start])
    parents = torch.full((batch, 1), -1, dtype=torch.long)
    tokens = torch.full((batch, 1), -1, dtype=torch.long)
    out: list[MiMLevel] = []
    n_mask = num_masked(grid**3, mask_ratio)
    for lvl in range(levels):
        n = boxes.shape[1]
        volumes = crop_resize(image, boxes, img_size)
        has_children = lvl + 1 < levels
        block = cube_block(sides[lvl], grid, sides[lvl + 1], mask_block) if has_children else mask_block
        if has_children and n_mask < block**3:
            raise ValueError(f"mask_ratio={mask_ratio} masks no whole {block}^3-token cube at level {lvl + 1}.")
        if lvl == 0:
            scores = score_fn(volumes)  # [B, L]
            order = mps_cube_scores(scores, (grid,) * 3, block, share, threshold, generator=generator)
            mask = mask_from_scores(order, n_mask)
        else:
            mask = block_masking(batch * n, (grid,) * 3, mask_ratio, block, generator=generator, device=image.device)
        level = MiMLevel(volumes, mask, boxes, parents, tokens, block)
        out.append(level)
        if has_children:
            boxes, parents, tokens = _sample_children(level, batch, sides[lvl], grid, sides[lvl + 1], gamma, generator)
    return out


__all__ = ["mps_mim_levels"]
