"""Token masks for masked image modelling: random (MAE) and block-wise (SimMIM), plus patchify.

Conventions (as in MAE's ``random_masking``)::

    x:           [N, L, D]   tokens, L = gd * gh * gw in (d, h, w) row-major order
    mask:        [N, L]      0 is keep, 1 is remove
    ids_keep:    [N, K]      indices of the kept tokens, K = L - round(L * mask_ratio)
    ids_restore: [N, L]      argsort of the shuffle; ``gather`` with it undoes the shuffle

The token order is the order of MONAI's conv patch embedding (``conv(x).flatten(2)``), so a mask
index ``i`` names the same cube of voxels for the encoder, the decoder and the targets.

References: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022;
Xie et al., "SimMIM: a Simple Framework for Masked Image Modeling", CVPR 2022.

Example::

    >>> m = random_masking(2, 64, 0.75)
    >>> m.mask.sum(1)  # tensor([48., 48.])
    >>> b = block_masking(2, (4, 4, 4), 0.5, block=2)  # whole 2x2x2-token cubes
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange


class TokenMask(NamedTuple):
    """A per-sample token mask and the indices MAE-style encoders and decoders need."""

    mask: torch.Tensor  # [N, L] float, 0 is keep, 1 is remove
    ids_keep: torch.Tensor  # [N, K] long
    ids_restore: torch.Tensor  # [N, L] long


def num_masked(num_tokens: int, mask_ratio: float) -> int:
    """Exact number of masked tokens, ``round(L * ratio)`` clamped so >= 1 token stays visible."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio should be in the range (0, 1), got {mask_ratio}.")
    return int(min(max(round(num_tokens * mask_ratio), 1), num_tokens - 1))


def mask_from_scores(scores: torch.Tensor, n_mask: int) -> TokenMask:
    """Mask the ``n_mask`` lowest-scoring tokens of each row.

    scores: [N, L] (any float; ties broken by index). Every row gets exactly ``n_mask`` masked
    tokens, so ``ids_keep`` is a dense [N, L - n_mask] tensor.
    """
    n, length = scores.shape
    ids_shuffle = torch.argsort(scores, dim=1)  # [N, L]: masked first, then kept
    ids_keep = ids_shuffle[:, n_mask:]  # [N, K]
    mask = torch.zeros(n, length, device=scores.device)
    mask.scatter_(1, ids_shuffle[:, :n_mask], 1.0)
    # Kept tokens in ascending position order: cheaper gathers and easier to read.
    ids_keep, _ = torch.sort(ids_keep, dim=1)
    return TokenMask(mask, ids_keep, _restore_from_keep(mask, ids_keep))


def _restore_from_keep(mask: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """ids_restore for the order [kept tokens (ascending), masked tokens (ascending)]."""
    # Stable sort on the mask puts kept tokens (0) first, each group in position order.
    ids_shuffle = torch.sort(mask, dim=1, stable=True).indices  # [N, L]
    return torch.argsort(ids_shuffle, dim=1)


def random_masking(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMask:
    """MAE's per-sample uniform random masking with an exact ratio.

    Returns mask [N, L] (1 = removed), ids_keep [N, K], ids_restore [N, L].
    """
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)  # [N, L]
    return mask_from_scores(noise, num_masked(num_tokens, mask_ratio))


def block_scores(
    batch: int,
    grid: Sequence[int],
    block: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Scores that order tokens block by block: [N, L].

    The token grid is cut into aligned ``block^3`` cubes (edge cubes may be smaller); each cube
    gets a random rank, and a token's score is its cube's rank plus a sub-unit jitter, so sorting
    the scores lists whole cubes in a random order.
    """
    gd, gh, gw = (int(g) for g in grid)
    cd, ch, cw = (-(-g // block) for g in (gd, gh, gw))  # cubes per axis (ceil)
    n_cubes = cd * ch * cw
    ranks = torch.argsort(torch.rand(batch, n_cubes, generator=generator, device=device), dim=1).float()
    ranks = ranks.view(batch, 1, cd, ch, cw)
    # Token -> its cube's rank: nearest upsampling by `block`, cropped to the grid.
    per_token = F.interpolate(ranks, scale_factor=block, mode="nearest")[:, :, :gd, :gh, :gw]
    jitter = torch.rand(batch, gd * gh * gw, generator=generator, device=device) * 0.5
    return per_token.reshape(batch, -1) + jitter  # [N, L]


def block_masking(
    batch: int,
    grid: Sequence[int],
    mask_ratio: float,
    block: int = 1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMask:
    """SimMIM-style masking of contiguous 3D cubes of ``block^3`` tokens, exact ratio.

    Cubes are masked whole in a random order; only the last one may be partly masked, so that
    every sample has exactly ``round(L * mask_ratio)`` masked tokens. ``block=1`` is random
    masking. grid: tokens per axis (gd, gh, gw).
    """
    if block < 1:
        raise ValueError(f"block should be >= 1, got {block}.")
    length = math.prod([int(g) for g in grid])  # host ints, no tensor read; a list (torch.compile traces it)
    if block == 1:  # same draws as MAE's random masking, so block=1 reproduces it exactly
        return random_masking(batch, length, mask_ratio, generator=generator, device=device)
    scores = block_scores(batch, grid, block, generator=generator, device=device)
    return mask_from_scores(scores, num_masked(length, mask_ratio))


def mask_from_keep(ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[N, K] kept indices -> [N, L] mask (1 = removed)."""
    mask = torch.ones(ids_keep.shape[0], num_tokens, device=ids_keep.device)
    return mask.scatter(1, ids_keep, 0.0)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: [N, L, D], ids: [N, K] -> [N, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """imgs: [N, C, D, H, W] -> [N, L, p^3 * C], tokens in MONAI's (d, h, w) order."""
    return rearrange(imgs, "n c (d p) (h q) (w r) -> n (d h w) (p q r c)", p=patch, q=patch, r=patch)


def unpatchify(x: torch.Tensor, patch: int, grid: Sequence[int], channels: int) -> torch.Tensor:
    """[N, L, p^3 * C] -> [N, C, D, H, W] (inverse of :func:`patchify`)."""
    gd, gh, gw = (int(g) for g in grid)
    return rearrange(
        x, "n (d h w) (p q r c) -> n c (d p) (h q) (w r)", d=gd, h=gh, w=gw, p=patch, q=patch, r=patch, c=channels
    )


def mask_to_volume(mask: torch.Tensor, grid: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Token mask [N, L] -> voxel mask [N, 1, *size] (nearest upsampling, 1 = removed)."""
    gd, gh, gw = (int(g) for g in grid)
    vol = mask.float().view(-1, 1, gd, gh, gw)
    return F.interpolate(vol, size=tuple(int(s) for s in size), mode="nearest")
