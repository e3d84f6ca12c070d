"""iBOT block masks: exact patch counts, block structure, determinism, and the per-batch ratio spread."""

import numpy as np
import pytest
import scipy.ndimage
import torch

from braindino.augment import BlockMaskGenerator, sample_batch_masks


@pytest.mark.parametrize("grid", [(14, 14), (7, 9), (1, 5)])
def test_masks_have_exactly_the_requested_number_of_patches(grid):
    generator = BlockMaskGenerator(grid)
    n_patches = grid[0] * grid[1]
    rng = np.random.default_rng(0)
    for n_masked in sorted({0, 1, 3, 4, n_patches // 3, n_patches // 2, n_patches - 1, n_patches}):
        for _ in range(10):
            mask = generator(n_masked, rng)
            assert mask.shape == grid and mask.dtype == bool
            assert mask.sum() == n_masked


def test_masks_are_made_of_blocks_not_scattered_patches():
    generator = BlockMaskGenerator((14, 14))
    rng = np.random.default_rng(1)
    patches_per_component = []
    for _ in range(50):
        mask = generator(40, rng)
        _, n_components = scipy.ndimage.label(mask)
        patches_per_component.append(40 / n_components)
    scattered = rng.permutation(196)[:40]
    _, scattered_components = scipy.ndimage.label(np.isin(np.arange(196), scattered).reshape(14, 14))
    assert np.mean(patches_per_component) >= 8 > 40 / scattered_components


def test_below_the_minimum_block_the_top_up_grows_one_connected_region():
    generator = BlockMaskGenerator((14, 14), min_block_patches=4)
    rng = np.random.default_rng(2)
    for _ in range(20):
        mask = generator(3, rng)
        assert mask.sum() == 3 and scipy.ndimage.label(mask)[1] == 1


def test_blocks_respect_the_aspect_limit_when_nothing_needs_topping_up():
    generator = BlockMaskGenerator((20, 20), min_block_patches=16, max_aspect=1.0)
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = generator(16, rng)
        rows, cols = np.nonzero(mask)
        assert np.ptp(rows) == 3 and np.ptp(cols) == 3   # one 4x4 square: area 16 at aspect exactly 1


def test_masks_are_deterministic_per_seed_and_differ_across_seeds():
    generator = BlockMaskGenerator((14, 14))
    first = generator(60, np.random.default_rng(4))
    assert np.array_equal(first, generator(60, np.random.default_rng(4)))
    assert not np.array_equal(first, generator(60, np.random.default_rng(5)))


def test_impossible_requests_are_rejected():
    generator = BlockMaskGenerator((4, 4))
    with pytest.raises(ValueError, match="cannot mask 17"):
        generator(17, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        sample_batch_masks(4, (4, 4))
    with pytest.raises(ValueError, match="mask_ratio_range"):
        sample_batch_masks(4, (4, 4), (0.6, 0.2), 0.5, np.random.default_rng(0))


def test_batch_masks_spread_ratios_over_the_range_and_leave_the_rest_unmasked():
    batch, grid, low, high = 10, (14, 14), 0.1, 0.5
    masks = sample_batch_masks(batch, grid, (low, high), 0.5, np.random.default_rng(6))
    assert masks.shape == (batch, 196) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    assert (counts == 0).sum() == 5
    ratios = np.sort(counts[counts > 0].numpy() / 196)
    edges = np.linspace(low, high, 6)
    assert np.all(ratios >= edges[:-1] - 0.5 / 196) and np.all(ratios <= edges[1:] + 0.5 / 196)


@pytest.mark.parametrize("batch, probability, n_masked", [(7, 0.5, 4), (9, 0.25, 2), (8, 0.0, 0), (6, 1.0, 6)])
def test_number_of_masked_images_is_rounded_batch_times_probability(batch, probability, n_masked):
    masks = sample_batch_masks(batch, (6, 6), (0.2, 0.4), probability, np.random.default_rng(7))
    assert (masks.sum(dim=1) > 0).sum() == n_masked


def test_which_images_are_masked_is_random_and_reproducible():
    def masked_rows(seed):
        masks = sample_batch_masks(16, (8, 8), (0.1, 0.5), 0.5, np.random.default_rng(seed))
        return tuple(torch.nonzero(masks.any(dim=1)).squeeze(1).tolist())

    assert masked_rows(8) == masked_rows(8)
    assert len({masked_rows(seed) for seed in range(10)}) > 5
    unmasked_fraction = np.mean([1 - len(masked_rows(seed)) / 16 for seed in range(10)])
    assert unmasked_fraction == pytest.approx(0.5)


def test_fast_fill_and_erosion_equal_scipys_on_random_masks():
    from scipy import ndimage

    from braindino.ingest.head_mask import AXIAL_FILL_STRUCTURE, _eroded, _holes_filled
    rng = np.random.default_rng(0)
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(4, 28, 3))
        mask = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2.0)) > rng.uniform(0.45, 0.55)
        np.testing.assert_array_equal(_holes_filled(mask), ndimage.binary_fill_holes(mask))
        np.testing.assert_array_equal(_holes_filled(mask, AXIAL_FILL_STRUCTURE, edge_axes=(0, 1)),
                                      ndimage.binary_fill_holes(mask, structure=AXIAL_FILL_STRUCTURE))
        np.testing.assert_array_equal(_eroded(mask), ndimage.binary_erosion(mask, structure=np.ones((3, 3, 3)),
                                                                            border_value=1))
