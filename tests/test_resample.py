"""Resolution changes: relative-position tables resampled as unilm does (cubic on a
geometric-progression grid), absolute embeddings bicubically; never re-initialised to zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import beitdist
from beitdist.backbone.resample import resample_pos_embed, resample_rel_pos_table


def unilm_positions(src_side: int, dst_side: int) -> np.ndarray:
    """unilm's geometric progression grid for a (2*src_side-1)-long offset axis, restated from
    unilm's run_class_finetuning.py (bisection of q in [1.01, 1.5])."""
    src, dst = 2 * src_side - 1, 2 * dst_side - 1
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if 1 * (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0] + dis, dtype=np.float64)


def _table(side: int, heads: int, fill) -> torch.Tensor:
    n = 2 * side - 1
    ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    values = np.stack([fill(ys, xs, h) for h in range(heads)], axis=-1).reshape(n * n, heads)
    extra = np.arange(3 * heads, dtype=np.float64).reshape(3, heads) + 100.0
    return torch.tensor(np.concatenate([values, extra]), dtype=torch.float32)


def test_224_to_384_shapes_centre_and_cls_rows():
    torch.manual_seed(0)
    table = torch.randn(27 * 27 + 3, 12)
    out = resample_rel_pos_table(table, (14, 14), (24, 24))
    assert out.shape == (47 * 47 + 3, 12)
    src, dst = table[:-3].view(27, 27, 12), out[:-3].view(47, 47, 12)
    # offsets -1, 0, +1 keep their places on the geometric grid: their values are the originals
    torch.testing.assert_close(dst[22:25, 22:25], src[12:15, 12:15], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[-3:], table[-3:], atol=0, rtol=0)
    assert (dst.abs() > 0).float().mean() > 0.99  # never the zeros transformers puts there


def test_cubic_in_unilm_grid_coordinates_is_reproduced_exactly():
    """An interpolating bicubic spline reproduces any cubic polynomial, so values that are a cubic
    of the unilm grid positions must come out as that cubic at the new integer offsets."""
    src_side, dst_side = 7, 12
    pos = unilm_positions(src_side, dst_side)

    def cubic(y, x):
        return 0.3 + 0.1 * y - 0.02 * x * y + 0.001 * x**3 - 0.004 * y**2

    table = _table(src_side, 2, lambda ys, xs, h: cubic(pos[ys], pos[xs]) * (h + 1))
    out = resample_rel_pos_table(table, (src_side, src_side), (dst_side, dst_side))
    n = 2 * dst_side - 1
    offsets = np.arange(n) - (dst_side - 1)
    ys, xs = np.meshgrid(offsets, offsets, indexing="ij")
    for head in range(2):
        expected = cubic(ys, xs) * (head + 1)
        np.testing.assert_allclose(out[:-3, head].view(n, n).numpy(), expected, atol=1e-4)


def test_shrinking_keeps_central_offsets():
    table = torch.randn(13 * 13 + 3, 2)
    out = resample_rel_pos_table(table, (7, 7), (4, 4))
    assert out.shape == (7 * 7 + 3, 2)
    torch.testing.assert_close(out[:-3].view(7, 7, 2), table[:-3].view(13, 13, 2)[3:10, 3:10], atol=1e-5, rtol=0)


def test_rectangular_grid():
    table = torch.randn(7 * 9 + 3, 3)
    out = resample_rel_pos_table(table, (4, 5), (6, 8))
    assert out.shape == (11 * 15 + 3, 3)
    torch.testing.assert_close(out[:-3].view(11, 15, 3)[5, 7], table[:-3].view(7, 9, 3)[3, 4], atol=1e-5, rtol=0)


def test_table_that_does_not_fit_its_grid_is_refused():
    with pytest.raises(ValueError, match="does not fit a"):
        resample_rel_pos_table(torch.zeros(10, 2), (14, 14), (24, 24))


def test_pos_embed_bicubic():
    pos = torch.randn(1, 1 + 16, 8)
    out = resample_pos_embed(pos, (4, 4), (6, 6))
    assert out.shape == (1, 37, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, 8))


@pytest.mark.parametrize("rel_pos_bias", ["per_block", "shared"])
def test_load_model_at_a_higher_resolution(tmp_path, rel_pos_bias):
    config = beitdist.BackboneConfig(
        embed_dim=32, depth=2, num_heads=4, image_size=64, patch_size=16, rel_pos_bias=rel_pos_bias, abs_pos_emb=True
    )
    source = beitdist.build_model(config, "classification", {"num_classes": 3})
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()
    beitdist.save_checkpoint(source, tmp_path / "ckpt")
    model = beitdist.load_model(tmp_path / "ckpt", head="classification", image_size=96)
    assert model.config.image_size == (96, 96) and model.config.grid_size == (6, 6)
    src_tables = {n: p for n, p in source.named_parameters() if "relative_position_bias_table" in n}
    for name, p in model.named_parameters():
        if name in src_tables:
            assert p.shape == (11 * 11 + 3, 4)
            torch.testing.assert_close(p[:-3].view(11, 11, 4)[4:7, 4:7], src_tables[name][:-3].view(7, 7, 4)[2:5, 2:5])
            assert p.abs().min() > 0
    assert model.backbone.pos_embed.shape == (1, 37, 32)
    assert model(torch.randn(1, 3, 96, 96)).logits.shape == (1, 3)
