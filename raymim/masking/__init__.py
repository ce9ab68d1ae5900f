"""Masking as pure functions (torch): token masks, patchify, MiM multi-level volumes.

Shapes follow MAE: ``x: [N, L, D]``, ``mask: [N, L], 0 is keep, 1 is remove``.
"""

from raymim.masking.multilevel import MiMLevel, crop_resize, cube_block, level_box_sides, mim_levels
from raymim.masking.tokens import (
    TokenMask,
    block_masking,
    block_scores,
    gather_tokens,
    mask_from_keep,
    mask_from_scores,
    mask_to_volume,
    num_masked,
    patchify,
    random_masking,
    unpatchify,
)

__all__ = [
    "MiMLevel",
    "TokenMask",
    "block_masking",
    "block_scores",
    "crop_resize",
    "cube_block",
    "gather_tokens",
    "level_box_sides",
    "mask_from_keep",
    "mask_from_scores",
    "mask_to_volume",
    "mim_levels",
    "num_masked",
    "patchify",
    "random_masking",
    "unpatchify",
]
