"""BEiT's blockwise masking: which patches the backbone sees as `mask_token` during MIM pretraining.

Follows unilm's `beit/masking_generator.py` decision for decision, because the masks' statistics
(block sizes, aspect ratios, how often the budget is met exactly) shape what pretraining learns:

- a block gets a target area drawn uniformly between `min_num_patches` and the remaining budget
  (capped by `max_num_patches`) and a log-uniform aspect ratio; its side lengths are the ROUNDED
  square roots, so a block can come out up to ~25% smaller than `min_num_patches` (e.g. a 16-patch
  target at aspect 0.39 becomes 2x6). unilm guarantees the area only before rounding; so do we.
- a block must be strictly smaller than the grid on both sides (timm's random-erasing heritage),
  and is kept only if it adds at least one and at most `budget` new patches (blocks may overlap
  earlier ones, so connected regions are unions of rectangles);
- ten tries per block; when all ten fail the mask is returned as is, so a mask can fall short of
  `num_masking_patches` (rarely, by a few patches) but never exceeds it.

Randomness comes from a `numpy.random.Generator`, never the global RNG: `sample_for(index, epoch)`
derives the generator from (seed, epoch, index), so a sample's mask does not depend on how many
data-loader workers there are or which one draws it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import numpy as np

from beitdist.errors import InputError

log = logging.getLogger(__name__)

UNILM_GRID = (14, 14)
UNILM_NUM_MASKING_PATCHES = 75
UNILM_MIN_NUM_PATCHES = 16
UNILM_RATIO = UNILM_NUM_MASKING_PATCHES / (UNILM_GRID[0] * UNILM_GRID[1])
"""75 / 196 ≈ 0.38, BEiT's "about 40%"."""


class Block(NamedTuple):
    """One accepted rectangle; `added` counts the patches it newly masked (it may overlap)."""

    top: int
    left: int
    height: int
    width: int
    added: int


def _grid(grid: tuple[int, int] | int) -> tuple[int, int]:
    height, width = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if height < 1 or width < 1:
        raise InputError(f"masking grid must be positive, got {height}x{width}")
    return int(height), int(width)


def num_masking_patches_for(grid: tuple[int, int] | int, ratio: float = UNILM_RATIO) -> int:
    """unilm's 75-of-196 budget carried over to any grid: round(ratio * H * W), at least 1."""
    height, width = _grid(grid)
    if not 0.0 < ratio <= 1.0:
        raise InputError(f"masking ratio must be in (0, 1], got {ratio}")
    return max(1, min(height * width, round(ratio * height * width)))


def min_num_patches_for(grid: tuple[int, int] | int, num_masking_patches: int) -> int:
    """unilm's minimum block of 16 (on 196 patches) scaled by grid area, so small grids keep
    several blocks instead of one: round(16 * H * W / 196), raised to 4 (a 2x2 block) where the
    budget allows, and never more than the budget or the largest placeable block (H-1)(W-1)."""
    height, width = _grid(grid)
    scaled = round(UNILM_MIN_NUM_PATCHES * height * width / (UNILM_GRID[0] * UNILM_GRID[1]))
    largest = max(1, (height - 1) * (width - 1))
    return max(1, min(max(4, scaled), num_masking_patches, largest))


class MaskingGenerator:
    """Blockwise masks of shape (H, W), True = masked. `seed` seeds the generator used when none
    is passed to a call; `sample_for` makes masks a pure function of (seed, epoch, index)."""

    def __init__(
        self,
        grid: tuple[int, int] | int,
        num_masking_patches: int = UNILM_NUM_MASKING_PATCHES,
        min_num_patches: int = UNILM_MIN_NUM_PATCHES,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.height, self.width = _grid(grid)
        self.num_patches = self.height * self.width
        if not 0 <= num_masking_patches <= self.num_patches:
            raise InputError(
                f"num_masking_patches must be in [0, {self.num_patches}] for a {self.height}x{self.width} grid, "
                f"got {num_masking_patches}"
            )
        if min_num_patches < 1:
            raise InputError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if self.height < 2 or self.width < 2:
            raise InputError(
                f"blockwise masking needs a grid of at least 2x2 (blocks are strictly smaller than the grid), "
                f"got {self.height}x{self.width}"
            )
        max_aspect = max_aspect or 1.0 / min_aspect
        if not 0.0 < min_aspect <= max_aspect:
            raise InputError(f"need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_masking_patches if max_num_patches is None else int(max_num_patches)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @classmethod
    def for_grid(
        cls, grid: tuple[int, int] | int, ratio: float = UNILM_RATIO, seed: int | None = None, **kwargs: Any
    ) -> MaskingGenerator:
        """unilm's recipe scaled to `grid` (exactly 75 / min 16 on 14x14)."""
        count = num_masking_patches_for(grid, ratio)
        return cls(grid, count, min_num_patches_for(grid, count), seed=seed, **kwargs)

    def __repr__(self) -> str:
        lo, hi = (math.exp(v) for v in self.log_aspect_ratio)
        return (
            f"MaskingGenerator({self.height}x{self.width}, {self.num_masking_patches} patches, "
            f"blocks [{self.min_num_patches}, {self.max_num_patches}], aspect [{lo:.3f}, {hi:.3f}])"
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> Block | None:
        for _ in range(10):
            # unilm's random.uniform(a, b) also accepts a > b (budget below the minimum block).
            lo, hi = sorted((self.min_num_patches, budget))
            target_area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top : top + h, left : left + w]
                added = h * w - int(window.sum())
                if 0 < added <= budget:
                    window[...] = True
                    return Block(top, left, h, w, added)
        return None

    def sample(self, rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[Block]]:
        """A mask and the blocks that made it, in order (the blocks are for inspection and tests)."""
        rng = self.rng if rng is None else rng
        mask = np.zeros(self.shape, dtype=bool)
        blocks: list[Block] = []
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            block = self._block(mask, budget, rng)
            if block is None:
                break
            blocks.append(block)
            count += block.added
        return mask, blocks

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """A bool mask (H, W); `torch.from_numpy(mask.reshape(-1))` gives `bool_masked_pos`."""
        return self.sample(rng)[0]

    def sample_for(self, index: int, epoch: int = 0) -> np.ndarray:
        """The mask of sample `index` in `epoch`: independent of worker count and draw order."""
        if self.seed is None:
            raise ValueError("sample_for needs a MaskingGenerator built with a seed")
        return self(np.random.default_rng([self.seed, epoch, index]))
