"""Resolution changes: resample relative-position tables and absolute position embeddings.

Relative-position tables follow unilm's fine-tuning code: the (2H-1) x (2W-1) offset grid of the
source is laid on a geometric-progression grid (offsets near the centre keep their spacing, far ones
are compressed) and a bicubic interpolating spline is evaluated at the integer offsets of the
target. unilm used `scipy.interpolate.interp2d(kind="cubic")`, removed in SciPy 1.14; on a
rectangular grid that was an interpolating (s=0) bicubic spline, which `RectBivariateSpline`
computes identically. The three cls rows are carried over unchanged. Linear interpolation, and
transformers' re-initialisation to zeros, both lose accuracy (ADE20K) and are not used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from beitdist.errors import InputError

NUM_CLS_ROWS = 3


def _geometric_offsets(src: int, dst: int) -> np.ndarray:
    """Positions of the src offsets -(src//2)..src//2 on a grid stretched to span dst//2 (dst > src).

    Spacing grows by a ratio q, found by bisection as in unilm, so that the outermost offset lands
    near dst//2 while offsets -1, 0, 1 keep their places (their values are kept exactly).
    """
    half = src // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        total = (1.0 - q**half) / (1.0 - q)
        if total > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(half):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0.0] + dis)


def _resample_axis_grid(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Source positions and target query points for one axis of an offset grid (odd lengths).

    Growing stretches the source onto a geometric grid; shrinking keeps the central offsets, whose
    meaning (a distance in patches) does not change with the resolution.
    """
    source = np.arange(-(src // 2), src // 2 + 1, dtype=np.float64)
    target = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
    if dst > src:
        source = _geometric_offsets(src, dst)
    return source, target


def resample_rel_pos_table(
    table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """(R_src, heads) table for a src_grid patch grid -> (R_dst, heads) table for dst_grid."""
    src_h, src_w = 2 * src_grid[0] - 1, 2 * src_grid[1] - 1
    dst_h, dst_w = 2 * dst_grid[0] - 1, 2 * dst_grid[1] - 1
    expected = src_h * src_w + NUM_CLS_ROWS
    if table.ndim != 2 or table.shape[0] != expected:
        raise InputError(
            f"relative-position table of shape {tuple(table.shape)} does not fit a {src_grid} grid "
            f"(expected {expected} rows)"
        )
    if (src_h, src_w) == (dst_h, dst_w):
        return table.clone()
    if min(src_h, src_w) < 3:
        raise InputError(f"cannot resample a relative-position table from a {src_grid} grid (need >= 2 patches a side)")
    # imported here: scipy.interpolate costs ~1 s of every CLI start and every worker, and only a
    # change of resolution needs it
    from scipy.interpolate import RectBivariateSpline

    offsets, cls_rows = table[:-NUM_CLS_ROWS], table[-NUM_CLS_ROWS:]
    ys, dys = _resample_axis_grid(src_h, dst_h)
    xs, dxs = _resample_axis_grid(src_w, dst_w)
    grids = offsets.detach().double().cpu().numpy().reshape(src_h, src_w, -1)
    heads = []
    for head in range(grids.shape[-1]):
        kx = min(3, src_w - 1)
        ky = min(3, src_h - 1)
        spline = RectBivariateSpline(ys, xs, grids[:, :, head], kx=kx, ky=ky, s=0)
        heads.append(spline(dys, dxs).reshape(-1))
    resampled = torch.from_numpy(np.stack(heads, axis=-1)).to(table.dtype)
    return torch.cat((resampled, cls_rows.detach().cpu()), dim=0)


def grid_from_table_rows(rows: int) -> tuple[int, int]:
    """The square patch grid whose relative-position table has `rows` rows."""
    side = round(((rows - NUM_CLS_ROWS) ** 0.5 + 1) / 2)
    if (2 * side - 1) ** 2 + NUM_CLS_ROWS != rows:
        raise InputError(f"a relative-position table with {rows} rows does not belong to a square patch grid")
    return (side, side)


def resample_pos_embed(pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + N_src, D) absolute embedding -> (1, 1 + N_dst, D); bicubic on the patch part."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed.clone()
    dim = pos_embed.shape[-1]
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, src_grid[0], src_grid[1], dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=dst_grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat((cls, patches), dim=1)
