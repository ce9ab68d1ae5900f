"""Random / block token masks and patchify: exact ratios, index consistency, token order."""

from __future__ import annotations

import pytest
import torch

from raymim.masking import (
    block_masking,
    gather_tokens,
    mask_from_keep,
    mask_to_volume,
    num_masked,
    patchify,
    random_masking,
    unpatchify,
)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.6, 0.75, 0.9])
def test_random_masking_exact(ratio: float):
    m = random_masking(3, 216, ratio)
    k = 216 - round(216 * ratio)
    assert m.mask.shape == (3, 216) and m.ids_keep.shape == (3, k) and m.ids_restore.shape == (3, 216)
    assert torch.all(m.mask.sum(1) == 216 - k)
    assert torch.equal(mask_from_keep(m.ids_keep, 216), m.mask)
    # ids_restore undoes [kept, masked] ordering
    x = torch.arange(216.0).view(1, 216, 1).repeat(3, 1, 1)
    kept = gather_tokens(x, m.ids_keep)
    masked_ids = torch.sort(m.mask, dim=1, stable=True).indices[:, k:]
    shuffled = torch.cat([kept, gather_tokens(x, masked_ids)], dim=1)
    assert torch.equal(gather_tokens(shuffled, m.ids_restore), x)


def test_masking_is_seeded():
    a = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(1))
    b = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.mask, b.mask)


def test_num_masked_rejects_bad_ratio():
    with pytest.raises(ValueError, match=r"mask_ratio should be in the range \(0, 1\), got 1.0"):
        num_masked(10, 1.0)


@pytest.mark.parametrize("grid,block,ratio", [((4, 4, 4), 2, 0.5), ((6, 6, 6), 2, 0.6), ((6, 6, 6), 3, 0.6)])
def test_block_masking_masks_whole_cubes(grid, block, ratio):
    m = block_masking(4, grid, ratio, block)
    length = grid[0] * grid[1] * grid[2]
    assert torch.all(m.mask.sum(1) == round(length * ratio))
    c = grid[0] // block
    per_cube = m.mask.view(4, c, block, c, block, c, block).sum(dim=(2, 4, 6)).flatten(1)  # [N, cubes]
    partial = ((per_cube > 0) & (per_cube < block**3)).sum(1)
    assert torch.all(partial <= 1)  # only the last cube in the random order may be partial


def test_patchify_matches_monai_token_order():
    """Token l of patchify is the cube MONAI's conv patch embedding puts at position l."""
    from monai.networks.blocks import PatchEmbeddingBlock

    x = torch.rand(2, 1, 16, 16, 16)
    pe = PatchEmbeddingBlock(1, 16, 4, hidden_size=64, num_heads=4, pos_embed_type="none")
    with torch.no_grad():  # conv = identity on the 64 voxels of each patch
        pe.patch_embeddings.weight.copy_(torch.eye(64).view(64, 1, 4, 4, 4))
        pe.patch_embeddings.bias.zero_()
    assert torch.allclose(pe(x), patchify(x, 4), atol=1e-6)
    assert torch.equal(unpatchify(patchify(x, 4), 4, (4, 4, 4), 1), x)


def test_mask_to_volume():
    m = random_masking(1, 8, 0.5)
    vol = mask_to_volume(m.mask, (2, 2, 2), (8, 8, 8))
    assert vol.shape == (1, 1, 8, 8, 8) and vol.mean() == 0.5
    assert torch.equal(patchify(vol, 4).mean(-1), m.mask)
