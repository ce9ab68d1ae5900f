"""MiM multi-level masked volumes with true 3D block indexing.

Zhuang et al., "MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image Analysis",
IEEE TMI 2025 (arXiv:2404.15580). Level 1 is a large crop of the scan resized to the network
input; every level is masked; level l+1 holds ``gamma`` volumes (per sample) cropped from the
*masked* cubes of level l and resized to the same input size, so finer levels re-see, at higher
resolution, regions that the coarser level must reconstruct.

Geometry, all in voxels of the input image ``image[b]``:

* box sides are ``level_sizes`` voxels of the input image (default 192 -> 96 -> 16, the MiM
  reference code's sizes at the stored spacing; the train-time crop, ``prepare.crop_size``, is
  the level-1 box, 192^3 in ``mim.yaml``). They are scaled by
  ``min(1, min(image side) / level_sizes[0])`` only when the image is smaller than level 1 (a
  96^3 crop with the paper's [384, 96, 16] gives boxes 96, 24, 4);
* a level with children is masked by whole cubes of ``k^3`` tokens (true 3D blocks of the token
  grid, ``k`` the smallest divisor of the grid, >= ``mask_block``, whose cube holds a child box);
  a child box is drawn inside one *fully masked* cube, and its parent token is the token of that
  cube that holds the child's centre. (The public reference groups 27 consecutive flattened
  tokens, which are not a 3x3x3 cube; here cubes are real.)
* the last level (no children) is masked with ``mask_block`` (1 = MAE random masking), so with a
  single level MiM is exactly MAE.

``gamma`` children per *parent volume*, as the reference code does (``select_patches`` draws
``sample_usual = 4`` level-2 volumes from each level-1 volume and ``sample_down = 4`` level-3
volumes from *each* level-2 volume): level l holds ``gamma^(l-1)`` volumes per sample, so a
sample yields ``1 + gamma + ... + gamma^(L-1)`` volumes (21 for the paper's L = 3, gamma = 4).
The children of one parent lie in *distinct* fully masked cubes (the reference's top-k of random
scores over the masked groups); a parent with fewer fully masked cubes than ``gamma`` (possible
only with a custom ``level1_mask``) repeats its cubes rather than, as the reference would, cut a
child from a visible region.

Parent region: the ``k^3``-token cube a child was cut from (:func:`parent_cube`) is the region
MiM's cross-level alignment takes as the child's positive (the reference's group of 27 tokens at
level 1 -> 2, a single token at level 2 -> 3, where ``k = 1``).

Children are drawn on the masks' device, vectorised (:func:`_sample_children`), and cut with
index tensors (:func:`gather_boxes`): building the hierarchy reads nothing back from an
accelerator. Level-1 boxes are drawn on the host. (Until 2026-12 the children were drawn one by
one on the host, which read every parent mask back; same distribution, other random draws.)

Example::

    >>> levels = mim_levels(torch.rand(2, 1, 96, 96, 96), img_size=96, patch_size=16,
    ...                     level_sizes=[384, 96, 16], mask_ratio=0.6, gamma=4)
    >>> [lv.volumes.shape[0] for lv in levels]  # [2, 8, 32]: gamma per parent volume
    >>> levels[2].boxes.shape, levels[2].parent_token.shape  # [2, 16, 6], [2, 16]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from raymim.masking.tokens import TokenMask, block_masking, num_masked


class MiMLevel(NamedTuple):
    """One level of the MiM hierarchy (``n`` volumes per sample, sample-major)."""

    volumes: torch.Tensor  # [B * n, C, S, S, S] network inputs, row b * n + i
    mask: TokenMask  # mask [B * n, L] (1 = removed), ids_keep [B * n, K], ids_restore [B * n, L]
    boxes: torch.Tensor  # [B, n, 6] long: (z0, y0, x0, z1, y1, x1) in image voxels, end exclusive
    parent: torch.Tensor  # [B, n] long: index i of the parent volume in the level above (children of
    #                        parent i are rows i * gamma .. i * gamma + gamma - 1); -1 at level 1
    parent_token: torch.Tensor  # [B, n] long: flat (d, h, w) token index in the parent's grid; -1 at level 1
    block: int  # side, in tokens, of this level's masking cubes
    side: int = 0  # side of every box of this level, in image voxels (host-side, for labels)


def level_box_sides(image_shape: Sequence[int], level_sizes: Sequence[int], levels: int) -> list[int]:
    """Box side (image voxels) of each level: the paper's sizes, scaled to fit the image."""
    scale = min(1.0, min(int(s) for s in image_shape) / float(level_sizes[0]))
    return [max(1, int(round(s * scale))) for s in level_sizes[:levels]]


def cube_block(box_side: int, grid: int, child_side: int, min_block: int = 1) -> int:
    """Smallest cube side ``k`` (tokens) dividing ``grid`` whose cube holds a ``child_side`` box."""
    for k in range(max(1, min_block), grid + 1):
        if grid % k:
            continue
        # Integer-aligned room inside a cube [lo, lo + k * side / grid): exact integer arithmetic.
        if k * box_side - child_side * grid >= (0 if box_side % grid == 0 else grid):
            return k
    raise ValueError(
        f"a child box of side {child_side} does not fit any masking cube of a level box of side {box_side} "
        f"with a token grid of {grid}; use smaller method.level_sizes ratios."
    )


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform int in [0, high); draws nothing when there is a single choice."""
    if high <= 1:
        return 0
    return int(torch.randint(high, (1,), generator=generator).item())


def crop_resize(image: torch.Tensor, boxes: torch.Tensor, size: int, side: int | None = None) -> torch.Tensor:
    """image [B, C, D, H, W], boxes [B, n, 6] (equal sides, ``side`` voxels when given) -> [B * n, C, size, size, size].

    Boxes on the host are cut by slicing; boxes on the accelerator (the children drawn there by
    :func:`_sample_children`) are gathered with index tensors (:func:`gather_boxes`, the same
    voxels), so their coordinates never travel to the host.
    """
    if boxes.device.type != "cpu":
        out = gather_boxes(image, boxes, side)
    else:
        crops = []
        for b in range(boxes.shape[0]):
            for z0, y0, x0, z1, y1, x1 in boxes[b].tolist():
                crops.append(image[b, :, z0:z1, y0:y1, x0:x1])
        out = torch.stack(crops)
    if tuple(out.shape[2:]) != (size, size, size):
        out = F.interpolate(out, size=(size, size, size), mode="trilinear", align_corners=False)
    return out


def gather_boxes(image: torch.Tensor, boxes: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """image [B, C, D, H, W], boxes [B, n, 6] of one side -> the cubes they cut, [B * n, C, s, s, s].

    Advanced indexing with the boxes as index tensors on their own device (no host read of the
    coordinates); ``side`` (default: read from the boxes, which reads them) is the cube side.
    """
    batch, n = boxes.shape[:2]
    flat = boxes.reshape(batch * n, 6).to(image.device)
    if side is None:
        side = int(flat[0, 3] - flat[0, 0])
    steps = torch.arange(side, device=image.device)
    z, y, x = (flat[:, ax, None] + steps for ax in range(3))  # [B n, s] each
    rows = torch.arange(batch, device=image.device).repeat_interleave(n)
    # Index dims (rows, z, y, x) broadcast to [B n, s, s, s] and come first, then C.
    out = image[rows[:, None, None, None], :, z[:, :, None, None], y[:, None, :, None], x[:, None, None, :]]
    return out.permute(0, 4, 1, 2, 3)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers on ``device``: from ``generator`` (drawn on the host, then copied) or
    from the device's own generator, without reading anything back."""
    if generator is not None:
        return torch.rand(shape, generator=generator).to(device)
    return torch.rand(shape, device=device)


def parent_cube(parent_token: torch.Tensor, grid: int, block: int) -> torch.Tensor:
    """Flat index, in the parent's ``(grid / block)^3`` grid of masking cubes, of the cube that
    holds ``parent_token`` (flat (d, h, w) token indices, any shape): the region a child was cut
    from (its box lies inside that fully masked cube)."""
    cubes = grid // block
    d, h, w = parent_token // (grid * grid), (parent_token // grid) % grid, parent_token % grid
    return ((d // block) * cubes + h // block) * cubes + w // block


def _sample_children(
    parent: MiMLevel, batch: int, side: int, grid: int, child_side: int, gamma: int, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``gamma`` child boxes per parent volume inside distinct fully masked cubes of it.

    Each parent volume picks ``gamma`` of its fully masked ``k^3``-token cubes uniformly at random
    without replacement (repeating its best-scored one when it has fewer), and each child a
    uniform integer position of its box inside its cube. Vectorised on the mask's device:
    nothing is read back to the host (on a GPU this runs without a synchronisation). Returns
    boxes [B, n gamma, 6], parents [B, n gamma], parent tokens [B, n gamma], all long on the
    mask's device; parent volume i's children are rows i * gamma .. i * gamma + gamma - 1.
    """
    k = parent.block
    n = parent.boxes.shape[1]
    cubes = grid // k
    dev = parent.mask.mask.device
    count = batch * n * gamma
    # [B * n, cubes, k, cubes, k, cubes, k] -> a cube is fully masked when its min is 1.
    m = parent.mask.mask.view(batch * n, cubes, k, cubes, k, cubes, k)
    full = (m.amin(dim=(2, 4, 6)) > 0.5).flatten(1)  # [B * n, cubes^3]
    # Distinct random fully masked cubes per parent volume (the caller checked that each has one).
    scores = _rand((batch * n, cubes**3), gen, dev).masked_fill(~full, -1.0)
    top, picked = scores.topk(min(gamma, cubes**3), dim=1)  # [B n, gamma'] distinct cubes
    picked = torch.where(top >= 0, picked, picked[:, :1])  # fewer masked cubes than gamma: repeat
    if picked.shape[1] < gamma:
        picked = picked.repeat(1, -(-gamma // picked.shape[1]))[:, :gamma]
    cube = picked.flatten()  # [B n gamma]
    parents = torch.arange(n, device=dev).repeat_interleave(gamma).expand(batch, n * gamma)  # [B, n gamma]
    rows = torch.arange(batch * n, device=dev).repeat_interleave(gamma)  # [B n gamma]
    c = torch.stack([cube // (cubes * cubes), (cube // cubes) % cubes, cube % cubes], 1)  # [B n gamma, 3]
    origin = parent.boxes.to(dev).reshape(batch * n, 6)[rows, :3]  # [B n gamma, 3]
    lo_num = origin * grid + c * k * side  # cube start, times grid
    lo = -((-lo_num) // grid)  # ceil
    hi = (lo_num + k * side - child_side * grid) // grid  # floor(last valid start)
    span = hi - lo + 1
    start = lo + (_rand((count, 3), gen, dev) * span).long().minimum(span - 1)
    # The parent token holding the child's centre: floor(centre * grid / side), kept in the cube.
    t = ((2 * (start - origin) + child_side) * grid) // (2 * side)
    t = torch.minimum(torch.maximum(t, c * k), c * k + k - 1)
    boxes = torch.cat([start, start + child_side], 1).view(batch, n * gamma, 6)
    tokens = ((t[:, 0] * grid + t[:, 1]) * grid + t[:, 2]).view(batch, n * gamma)
    return boxes, parents.contiguous(), tokens


def mim_levels(
    image: torch.Tensor,
    img_size: int,
    patch_size: int,
    level_sizes: Sequence[int],
    mask_ratio: float,
    gamma: int,
    levels: int | None = None,
    mask_block: int = 1,
    *,
    generator: torch.Generator | None = None,
    level1_mask: Callable[[torch.Tensor, int], TokenMask] | None = None,
) -> list[MiMLevel]:
    """Build the MiM level hierarchy for a batch ``image`` [B, C, D, H, W].

    Returns one :class:`MiMLevel` per level; level 1 has one volume per sample, level l
    ``gamma^(l-1)`` (``gamma`` per parent volume). Masks have exactly ``round(L * mask_ratio)`` removed tokens.
    ``level1_mask(volumes, block) -> TokenMask`` replaces level 1's random cube masking (masked
    patch selection uses it to mask lesion cubes first); deeper levels stay random.
    """
    levels = len(level_sizes) if levels is None else levels
    if not 1 <= levels <= len(level_sizes):
        raise ValueError(f"levels should be in the range [1, {len(level_sizes)}], got {levels}.")
    if img_size % patch_size:
        raise ValueError(f"img_size should be a multiple of patch_size={patch_size}, got {img_size}.")
    batch = image.shape[0]
    grid = img_size // patch_size
    sides = level_box_sides(image.shape[2:], level_sizes, levels)
    # Level 1: one random box per sample.
    boxes = torch.zeros(batch, 1, 6, dtype=torch.long)
    for b in range(batch):
        start = [_randint(int(dim) - sides[0] + 1, generator) for dim in image.shape[2:]]
        boxes[b, 0] = torch.tensor(start + [s + sides[0] for s in start])
    parents = torch.full((batch, 1), -1, dtype=torch.long)
    tokens = torch.full((batch, 1), -1, dtype=torch.long)
    out: list[MiMLevel] = []
    for lvl in range(levels):
        n = boxes.shape[1]
        volumes = crop_resize(image, boxes, img_size, sides[lvl])
        has_children = lvl + 1 < levels
        block = cube_block(sides[lvl], grid, sides[lvl + 1], mask_block) if has_children else mask_block
        if has_children and num_masked(grid**3, mask_ratio) < block**3:
            raise ValueError(
                f"mask_ratio={mask_ratio} masks no whole {block}^3-token cube at level {lvl + 1}; "
                "raise it or use smaller level_sizes ratios."
            )
        if lvl == 0 and level1_mask is not None:
            mask = level1_mask(volumes, block)
        else:
            mask = block_masking(batch * n, (grid,) * 3, mask_ratio, block, generator=generator, device=image.device)
        level = MiMLevel(volumes, mask, boxes, parents, tokens, block, sides[lvl])
        out.append(level)
        if has_children:
            boxes, parents, tokens = _sample_children(level, batch, sides[lvl], grid, sides[lvl + 1], gamma, generator)
    return out
