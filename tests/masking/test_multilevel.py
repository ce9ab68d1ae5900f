"""MiM level hierarchy: shapes, exact ratios, and geometry (children inside masked cubes)."""

from __future__ import annotations

import pytest
import torch

from raymim.masking import crop_resize, cube_block, level_box_sides, mim_levels
from raymim.masking.multilevel import parent_cube


def _check_geometry(levels, grid: int) -> None:
    for parent, child in zip(levels, levels[1:]):
        batch, n_child = child.parent.shape
        n_parent = parent.boxes.shape[1]
        k = parent.block
        for b in range(batch):
            for j in range(n_child):
                i = int(child.parent[b, j])
                pbox = parent.boxes[b, i].tolist()
                side = pbox[3] - pbox[0]
                tok = int(child.parent_token[b, j])
                tz, ty, tx = tok // (grid * grid), (tok // grid) % grid, tok % grid
                # the parent token is masked, and so is its whole k^3 cube
                pmask = parent.mask.mask[b * n_parent + i].view(grid, grid, grid)
                cz, cy, cx = (t // k * k for t in (tz, ty, tx))
                assert pmask[cz : cz + k, cy : cy + k, cx : cx + k].min() == 1
                # the child box lies inside that cube (image voxels)
                cbox = child.boxes[b, j].tolist()
                for ax, c0 in enumerate((cz, cy, cx)):
                    lo = pbox[ax] + c0 * side / grid
                    hi = pbox[ax] + (c0 + k) * side / grid
                    assert lo <= cbox[ax] and cbox[ax + 3] <= hi
                    # and its centre lies in the parent token
                    t = (tz, ty, tx)[ax]
                    centre = (cbox[ax] + cbox[ax + 3]) / 2
                    assert pbox[ax] + t * side / grid <= centre <= pbox[ax] + (t + 1) * side / grid


def test_paper_shapes_geometry():
    g = torch.Generator().manual_seed(0)
    levels = mim_levels(torch.rand(2, 1, 96, 96, 96), 96, 16, [384, 96, 16], 0.6, 4, generator=g)
    # gamma = 4 children per parent volume (the reference's sample_usual / sample_down): 1, 4, 16 per sample
    assert [lv.volumes.shape for lv in levels] == [(2, 1, 96, 96, 96), (8, 1, 96, 96, 96), (32, 1, 96, 96, 96)]
    assert [lv.boxes[0, 0, 3] - lv.boxes[0, 0, 0] for lv in levels] == [96, 24, 4]
    for lv in levels:
        assert torch.all(lv.mask.mask.sum(1) == round(216 * 0.6))
        assert lv.mask.ids_keep.shape[1] == 216 - round(216 * 0.6)
    assert levels[0].block == 2 and levels[1].block == 1
    _check_geometry(levels, 6)


@pytest.mark.parametrize("seed", range(4))
def test_geometry_small_non_divisible(seed: int):
    """40x44x48 image (boxes 40, 16, 6, 2; token side 1.5 at level 3): fractional cube edges hold children."""
    g = torch.Generator().manual_seed(seed)
    levels = mim_levels(torch.rand(2, 1, 40, 44, 48), 32, 8, [40, 16, 6, 2], 0.7, 3, generator=g)
    assert len(levels) == 4 and levels[3].volumes.shape == (2 * 27, 1, 32, 32, 32)
    _check_geometry(levels, 4)


def test_single_level_is_a_whole_image_random_mask():
    img = torch.rand(2, 1, 32, 32, 32)
    torch.manual_seed(3)
    (lv,) = mim_levels(img, 32, 8, [384], 0.75, 4)
    torch.manual_seed(3)
    expected = torch.rand(2, 64).argsort(1)[:, :48]
    assert torch.equal(lv.volumes, img)
    assert torch.equal(lv.mask.mask.nonzero()[:, 1].view(2, 48).sort(1).values, expected.sort(1).values)


def test_crops_come_from_the_image():
    img = torch.arange(32.0**3).view(1, 1, 32, 32, 32)
    levels = mim_levels(img, 16, 4, [32, 16], 0.75, 2)
    z0, y0, x0, z1, y1, x1 = levels[1].boxes[0, 0].tolist()
    assert torch.equal(levels[1].volumes[0], img[0, :, z0:z1, y0:y1, x0:x1])  # 16^3 crop, no resize


def test_sides_and_blocks_and_errors():
    assert level_box_sides((96, 96, 96), [384, 96, 16], 3) == [96, 24, 4]
    assert level_box_sides((512, 512, 400), [384, 96, 16], 2) == [384, 96]
    assert cube_block(96, 6, 24) == 2 and cube_block(24, 6, 4) == 1
    with pytest.raises(ValueError, match="does not fit"):
        cube_block(32, 4, 40)
    with pytest.raises(ValueError, match="levels should be in the range"):
        mim_levels(torch.rand(1, 1, 32, 32, 32), 32, 8, [32, 16], 0.6, 2, levels=3)


def test_gathered_crops_are_the_sliced_crops():
    """Boxes on an accelerator are cut by index gathering (no host read): the same voxels as slicing."""
    from raymim.masking.multilevel import gather_boxes

    img = torch.rand(2, 2, 20, 22, 24)
    g = torch.Generator().manual_seed(0)
    starts = torch.stack([torch.randint(0, 20 - 7 + 1, (2, 3), generator=g) for _ in range(3)], -1)  # [2, 3, 3]
    boxes = torch.cat([starts, starts + 7], -1)  # [2, 3, 6], side 7
    expected = crop_resize(img, boxes, 7)  # host boxes: slicing
    assert torch.equal(gather_boxes(img, boxes), expected)
    assert torch.equal(gather_boxes(img, boxes, side=7), expected)


@pytest.mark.parametrize("seed", range(3))
def test_children_cover_every_fully_masked_cube(seed: int):
    """The vectorised sampler draws from all fully masked cubes of a parent, not a fixed one."""
    torch.manual_seed(seed)
    img = torch.rand(1, 1, 32, 32, 32)
    seen: set[int] = set()
    for _ in range(40):
        parent, child = mim_levels(img, 32, 8, [32, 16], 0.5, 4)
        k, cubes = parent.block, 4 // parent.block
        full = parent.mask.mask.view(cubes, k, cubes, k, cubes, k).amin(dim=(1, 3, 5)).flatten() > 0.5
        tok = child.parent_token.flatten()
        cube = (tok // 16 // k) * cubes * cubes + (tok // 4 % 4 // k) * cubes + (tok % 4 // k)
        assert full[cube].all()  # every child comes from a fully masked cube
        seen.update(int(c) for c in cube)
    assert len(seen) == cubes**3  # over draws, every cube is used (each is fully masked half the time)


@pytest.mark.parametrize("seed", range(3))
def test_gamma_children_per_parent_in_distinct_cubes_and_their_region(seed: int):
    """Each parent volume has exactly gamma children (rows i * gamma ...), cut from distinct fully
    masked cubes; parent_cube names the cube (region) that holds each child's box."""
    g = torch.Generator().manual_seed(seed)
    levels = mim_levels(torch.rand(2, 1, 96, 96, 96), 96, 16, [192, 96, 16], 0.6, 4, generator=g)
    grid = 6
    for parent, child in zip(levels, levels[1:]):
        n_parent, k = parent.boxes.shape[1], parent.block
        assert child.parent.shape == (2, n_parent * 4)
        assert torch.equal(child.parent, torch.arange(n_parent).repeat_interleave(4).expand(2, -1))
        region = parent_cube(child.parent_token, grid, k)  # [B, n gamma]
        assert region.max() < (grid // k) ** 3
        for b in range(2):
            for i in range(n_parent):
                mine = region[b, i * 4:(i + 1) * 4]
                assert len(set(mine.tolist())) == 4  # distinct cubes of one parent
                pbox, side = parent.boxes[b, i].tolist(), parent.side
                for j, r in zip(range(i * 4, (i + 1) * 4), mine.tolist()):
                    c = (r // (grid // k) ** 2, r // (grid // k) % (grid // k), r % (grid // k))
                    cbox = child.boxes[b, j].tolist()
                    for ax in range(3):  # the child's box lies in region r of its parent
                        assert pbox[ax] + c[ax] * k * side / grid <= cbox[ax]
                        assert cbox[ax + 3] <= pbox[ax] + (c[ax] + 1) * k * side / grid
    assert levels[0].block == 3 and levels[1].block == 1  # 8 regions of 27 tokens, then single tokens


def test_parent_cube_of_tokens():
    # grid 4, block 2: token (d, h, w) = (3, 0, 2) lies in cube (1, 0, 1) of a 2^3 cube grid
    tok = torch.tensor([3 * 16 + 0 * 4 + 2, 0])
    assert parent_cube(tok, 4, 2).tolist() == [1 * 4 + 0 * 2 + 1, 0]
    assert torch.equal(parent_cube(torch.arange(64), 4, 1), torch.arange(64))
