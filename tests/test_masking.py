"""BEiT blockwise masking: unilm's budget, block geometry, determinism, small grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from beitdist.data.masking import (
    MaskingGenerator,
    min_num_patches_for,
    num_masking_patches_for,
)


def test_unilm_budget_on_14x14():
    gen = MaskingGenerator(14, seed=0)
    counts = np.array([gen().sum() for _ in range(2000)])
    assert counts.max() <= 75
    # unilm's generator (same algorithm, python's random) averages 74.49 and hits 75 exactly in
    # ~68% of draws; falling short happens only when ten tries cannot fit the last few patches.
    assert 74.2 <= counts.mean() <= 74.8
    assert 0.6 <= (counts == 75).mean() <= 0.75
    assert counts.min() >= 60


def test_blocks_follow_unilm_geometry():
    gen = MaskingGenerator(14, num_masking_patches=75, min_num_patches=16, seed=3)
    lo, hi = 0.3, 1 / 0.3
    rng = np.random.default_rng(7)
    for _ in range(300):
        mask, blocks = gen.sample(rng)
        assert mask.dtype == np.bool_ and mask.shape == (14, 14)
        union = np.zeros_like(mask)
        budget = 75
        for block in blocks:
            assert 1 <= block.height < 14 and 1 <= block.width < 14
            assert 0 < block.added <= budget
            # Sides are rounded square roots of (target area * aspect), so only these hold exactly:
            # the unrounded area is >= min_num_patches unless the budget left was smaller, and the
            # unrounded aspect ratio is within [0.3, 1/0.3].
            if budget >= 16:
                assert (block.height + 0.5) * (block.width + 0.5) >= 16
            assert (block.height + 0.5) / max(block.width - 0.5, 1e-9) >= lo
            assert (block.height - 0.5) / (block.width + 0.5) <= hi
            union[block.top : block.top + block.height, block.left : block.left + block.width] = True
            budget -= block.added
        assert (union == mask).all()
        assert mask.sum() == 75 - budget
        # The first block is placed with the full budget, so every connected region that holds one
        # is at least a (rounded) minimum block: >= 12 patches for min 16 (e.g. 2x6 at aspect 0.39).
        labels, n = ndimage.label(mask)
        first = blocks[0]
        region = labels[first.top, first.left]
        assert (labels == region).sum() >= first.height * first.width >= 12
        for box in ndimage.find_objects(labels):  # every region's bounding box holds a whole block
            rows, cols = box[0].stop - box[0].start, box[1].stop - box[1].start
            assert any(b.height <= rows and b.width <= cols for b in blocks)


def test_rectangular_grid_shapes():
    gen = MaskingGenerator((6, 10), num_masking_patches=20, min_num_patches=4, seed=0)
    for _ in range(50):
        mask, blocks = gen.sample()
        assert mask.shape == (6, 10) and 0 < mask.sum() <= 20
        assert all(b.height < 6 and b.width < 10 for b in blocks)


def test_seed_determinism_and_worker_independence():
    a, b = MaskingGenerator(14, seed=11), MaskingGenerator(14, seed=11)
    assert all((a() == b()).all() for _ in range(20))
    c = MaskingGenerator(14, seed=12)
    assert any((a() != c()).any() for _ in range(5))
    # sample_for depends only on (seed, epoch, index), not on draw order
    forward = [a.sample_for(i, epoch=2) for i in range(8)]
    backward = [b.sample_for(i, epoch=2) for i in reversed(range(8))][::-1]
    assert all((x == y).all() for x, y in zip(forward, backward))
    assert any((x != y).any() for x, y in zip(forward, [a.sample_for(i, epoch=3) for i in range(8)]))
    with pytest.raises(ValueError, match="seed"):
        MaskingGenerator(14).sample_for(0)


def test_scaled_budget_rule():
    assert num_masking_patches_for(14) == 75 and min_num_patches_for(14, 75) == 16
    assert (num_masking_patches_for(8), min_num_patches_for(8, 24)) == (24, 5)
    assert (num_masking_patches_for(4), min_num_patches_for(4, 6)) == (6, 4)
    assert (num_masking_patches_for(2), min_num_patches_for(2, 2)) == (2, 1)
    assert num_masking_patches_for((14, 14), ratio=0.5) == 98
    with pytest.raises(ValueError, match="ratio"):
        num_masking_patches_for(8, ratio=0.0)


@pytest.mark.parametrize("grid", [4, 7, 8, (4, 6)])
def test_small_grids(grid):
    gen = MaskingGenerator.for_grid(grid, seed=0)
    h, w = gen.shape
    counts = np.array([gen().sum() for _ in range(300)])
    assert counts.max() <= gen.num_masking_patches
    assert counts.min() > 0
    assert counts.mean() >= gen.num_masking_patches - 1
    assert math.isclose(gen.num_masking_patches / (h * w), 75 / 196, abs_tol=0.5 / (h * w) + 1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_masking_patches"):
        MaskingGenerator(4, num_masking_patches=17)
    with pytest.raises(ValueError, match="2x2"):
        MaskingGenerator((1, 8), num_masking_patches=2, min_num_patches=1)
    with pytest.raises(ValueError, match="aspect"):
        MaskingGenerator(8, 10, 4, min_aspect=2.0, max_aspect=1.0)
