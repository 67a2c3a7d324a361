"""Augmentations: determinism, the two-view crop, RandAugment / RandomErasing / Mixup statistics,
segmentation geometry keeping labels on their pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from beitdist.data.augment import RAND_INCREASING_OPS, AugmentOp, rand_augment
from beitdist.data.mixup import Mixup, cutmix_box
from beitdist.data.pipeline import AugmentConfig
from beitdist.data.presets import ClassificationTrain, SegmentationTrain
from beitdist.data.seg_transforms import PhotoMetricDistortion, random_crop
from beitdist.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ColorJitter,
    RandomErasing,
    RandomResizedCrop,
    sample_rngs,
)
from beitdist.schema import OptionsError, parse


def gradient(width: int = 240, height: int = 180) -> Image.Image:
    """R = x, G = y: every pixel says where it came from."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def photo(size: int = 48) -> Image.Image:
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0][100 : 100 + size, 200 : 200 + size])


def test_sample_rngs_are_a_function_of_seed_epoch_index():
    a = [g.random() for g in sample_rngs(1, 2, 3)]
    assert a == [g.random() for g in sample_rngs(1, 2, 3)]
    assert a[0] != a[1]
    assert a != [g.random() for g in sample_rngs(1, 3, 3)] != [g.random() for g in sample_rngs(1, 2, 4)]


def test_classification_transform_is_deterministic_per_seed_epoch_index():
    tf = ClassificationTrain(32, AugmentConfig(reprob=1.0), seed=0)
    img = photo()
    a, b = tf(img, 3, index=5), tf(img, 3, index=5)
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert a["pixel_values"].shape == (3, 32, 32) and a["labels"] == 3
    assert not torch.equal(a["pixel_values"], tf(img, 3, index=6)["pixel_values"])
    tf.set_epoch(1)
    assert not torch.equal(a["pixel_values"], tf(img, 3, index=5)["pixel_values"])
    assert tf.color_jitter is None  # timm: no colour jitter next to RandAugment


def test_two_view_crop_takes_one_region_at_both_sizes():
    img = gradient()
    crop = RandomResizedCrop(64, scale=(0.2, 0.6), second_size=32)
    for seed in range(5):
        top, left, h, w = crop.params(img, np.random.default_rng(seed))
        main, second = crop(img, np.random.default_rng(seed))
        assert main.size == (64, 64) and second.size == (32, 32)
        for view, size in ((main, 64), (second, 32)):
            arr = np.asarray(view).astype(float)
            centers = (np.arange(size) + 0.5) / size
            expect_x, expect_y = left + centers * w - 0.5, top + centers * h - 0.5
            inner = slice(2, size - 2)  # away from the filter's clamped border
            np.testing.assert_allclose(arr[5, inner, 0], expect_x[inner], atol=1.5)
            np.testing.assert_allclose(arr[inner, 5, 1], expect_y[inner], atol=1.5)


def test_random_resized_crop_area_and_ratio_ranges():
    img = gradient(200, 200)
    crop = RandomResizedCrop(16)
    rng = np.random.default_rng(0)
    params = np.array([crop.params(img, rng) for _ in range(500)])
    area = params[:, 2] * params[:, 3] / (200 * 200)
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.4 < area.mean() < 0.65
    ratio = params[:, 3] / params[:, 2]
    assert ratio.min() >= 0.7 and ratio.max() <= 1.4


def test_color_jitter_ranges_and_identity():
    img = photo()
    assert np.array_equal(np.asarray(ColorJitter(0, 0, 0)(img, np.random.default_rng(0))), np.asarray(img))
    brightness = ColorJitter(0.4, 0, 0)
    ratios = [np.asarray(brightness(img, np.random.default_rng(s))).mean() / np.asarray(img).mean() for s in range(50)]
    assert 0.55 < min(ratios) < 0.7 and 1.3 < max(ratios) < 1.45


def test_rand_augment_parses_beit_config():
    ra = rand_augment("rand-m9-mstd0.5-inc1", mean=IMAGENET_DEFAULT_MEAN)
    assert [op.name for op in ra.ops] == list(RAND_INCREASING_OPS) and ra.num_layers == 2
    assert {(op.magnitude, op.magnitude_std, op.prob, op.fill) for op in ra.ops} == {(9.0, 0.5, 0.5, (124, 116, 104))}
    with pytest.raises(ValueError, match="unknown RandAugment section"):
        rand_augment("rand-m9-x3")
    with pytest.raises(OptionsError, match="rand_augment"):
        parse(AugmentConfig, {"rand_augment": "auto-m9"})


def test_rand_augment_op_arguments_follow_timm():
    rng = np.random.default_rng(0)
    levels = Image.fromarray(np.tile(np.arange(0, 256, dtype=np.uint8), (4, 1))).convert("RGB")
    bits = np.unique(np.asarray(AugmentOp("PosterizeIncreasing", 9, prob=1.0)(levels, rng)))
    assert bits.tolist() == [0, 128]  # 4 - int(0.9 * 4) = 1 bit kept
    solar = np.asarray(AugmentOp("SolarizeIncreasing", 9, prob=1.0)(levels, rng))[0, :, 0]
    assert solar[25] == 25 and solar[26] == 255 - 26  # threshold 256 - int(0.9 * 256) = 26
    flat = Image.new("RGB", (20, 20), (0, 0, 0))
    rotated = np.asarray(AugmentOp("Rotate", 10, prob=1.0, fill=(124, 116, 104))(flat, rng))
    assert tuple(rotated[0, 0]) == (124, 116, 104)  # gaps take the mean colour


def test_rand_augment_leaves_a_quarter_of_images_untouched():
    ra = rand_augment("rand-m9-mstd0.5-inc1")
    img = Image.fromarray(np.random.default_rng(0).integers(60, 180, (16, 16, 3), dtype=np.uint8))
    base = np.asarray(img)
    same = [np.array_equal(np.asarray(ra(img, np.random.default_rng(s))), base) for s in range(400)]
    assert 0.17 < np.mean(same) < 0.33  # both ops skip with probability 0.5 * 0.5


def test_random_erasing_statistics():
    erase = RandomErasing(0.25, mode="pixel")
    rng = np.random.default_rng(0)
    boxes = [erase.boxes(32, 32, rng) for _ in range(4000)]
    assert 0.22 < np.mean([bool(b) for b in boxes]) < 0.28
    areas = np.array([h * w / 1024 for b in boxes for _, _, h, w in b])
    assert areas.min() >= 0.01 and areas.max() <= 0.4 and 0.15 < areas.mean() < 0.2
    x = torch.full((3, 32, 32), 7.0)
    out = erase(x, np.random.default_rng(next(s for s in range(100) if RandomErasing(0.25).boxes(
        32, 32, np.random.default_rng(s)))))
    noise = out[out != 7.0]
    assert noise.numel() > 50 and abs(float(noise.mean())) < 0.3 and 0.7 < float(noise.std()) < 1.3


def test_mixup_targets_lambda_and_smoothing():
    mix = Mixup(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
    rng = np.random.default_rng(0)
    draws = [mix.params(rng) for _ in range(4000)]
    lam_mixup = np.array([lam for lam, cut in draws if not cut])
    assert 0.45 < np.mean([cut for _, cut in draws]) < 0.55
    assert abs(lam_mixup.mean() - 0.5) < 0.02 and abs(lam_mixup.var() - 0.64 / (2.56 * 2.6)) < 0.01  # Beta(.8, .8)

    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    for seed in range(20):
        mixed, target = mix(x, labels, np.random.default_rng(seed))
        torch.testing.assert_close(target.sum(1), torch.ones(4))
        lam = float(target[0, 0] - 0.02) / 0.9  # on = 0.92, off = 0.02 (smoothing 0.1 over 5 classes)
        if not torch.equal(mixed[0], x[0]):
            kept = float((mixed[0] == 0).float().mean()) if mixed[0].unique().numel() > 1 else None
            if kept is not None:  # cutmix: lambda is corrected to the pixels actually kept
                assert lam == pytest.approx(kept, abs=1e-5)
            else:
                assert float(mixed[0, 0, 0, 0]) == pytest.approx(3 * (1 - lam), abs=1e-5)
    no_mix = Mixup(5, prob=0.0, label_smoothing=0.1)
    _, target = no_mix(x, labels, rng)
    assert target.unique().tolist() == pytest.approx([0.02, 0.92])
    black = np.asarray(AugmentOp("PosterizeIncreasing", 10, prob=1.0)(photo(), rng))
    assert black.max() == 0  # 0 bits kept: what timm gave on the Pillow of its day


@pytest.mark.parametrize("batch", [4, 5])
def test_mixup_in_place_equals_timms_formula(batch):
    """The collate mixes its freshly stacked batch in place, pair by pair; the numbers are timm's
    `x * lam + x.flip(0) * (1 - lam)` and its pasted CutMix box, and without `inplace` the
    caller's tensor is left as it was."""
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch)
    for alphas in ((0.8, 0.0), (0.0, 1.0)):
        mix = Mixup(num_classes=batch, mixup_alpha=alphas[0], cutmix_alpha=alphas[1], label_smoothing=0.0)
        rng = np.random.default_rng(3)
        lam, cut = mix.params(rng)
        if cut:
            (y0, y1, x0, x1), lam = cutmix_box(16, 16, lam, rng)
            expected = x.clone()
            expected[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        else:
            expected = x * lam + x.flip(0) * (1 - lam)
        original = x.clone()
        copied, target = mix(x, labels, np.random.default_rng(3))
        assert torch.equal(x, original) and copied.data_ptr() != x.data_ptr()
        mixed, same_target = mix(x.clone(), labels, np.random.default_rng(3), inplace=True)
        for out in (copied, mixed):
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(target, same_target, rtol=0, atol=0)
        assert target[0, 0] == pytest.approx(lam) and target[0, batch - 1] == pytest.approx(1 - lam)
        if batch % 2:  # the middle sample is its own partner
            torch.testing.assert_close(mixed[batch // 2], x[batch // 2], rtol=1e-6, atol=1e-6)


def test_cutmix_box_lambda_correction():
    rng = np.random.default_rng(1)
    for lam in (0.1, 0.5, 0.9):
        (y0, y1, x0, x1), corrected = cutmix_box(32, 32, lam, rng)
        assert corrected == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1024)


def _palette_scene(height: int = 96, width: int = 128) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    labels = np.zeros((height, width), np.int64)
    labels[:, width // 3 :] = 1
    labels[height // 2 :, :] = 2
    labels[height // 4 : height // 2, width // 2 : width // 2 + 20] = 3
    return Image.fromarray(palette[labels]), labels, palette


def test_segmentation_transform_keeps_labels_on_their_pixels():
    image, labels, palette = _palette_scene()
    aug = AugmentConfig(photometric=False, normalization="standard")
    tf = SegmentationTrain(64, aug, seed=0)
    for index in range(6):
        out = tf(image, labels, index)
        pix, lab = out["pixel_values"], out["labels"]
        assert pix.shape == (3, 64, 64) and lab.shape == (64, 64) and lab.dtype == torch.long
        rgb = ((pix.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255)
        nearest = np.abs(rgb[:, :, None, :] - palette[None, None].astype(float)).sum(-1).argmin(-1)
        valid = lab.numpy() != 255
        assert (nearest[valid] == lab.numpy()[valid]).mean() > 0.95


def test_segmentation_pads_with_ignore_and_zero():
    image, labels, _ = _palette_scene(48, 64)
    aug = AugmentConfig(seg_base_scale=(64, 32), seg_ratio_range=(0.5, 1.0), photometric=False)
    out = SegmentationTrain(64, aug, seed=0)(image, labels, 0)
    lab, pix = out["labels"], out["pixel_values"]
    rows = (lab != 255).any(1).nonzero().max() + 1
    cols = (lab != 255).any(0).nonzero().max() + 1
    assert rows <= 32 and cols <= 43
    assert (lab[rows:] == 255).all() and (lab[:, cols:] == 255).all()
    assert (pix[:, rows:] == 0).all() and (pix[:, :, cols:] == 0).all()


def test_cat_max_ratio_avoids_single_class_crops():
    labels = np.zeros((100, 100), np.int64)
    labels[:, 80:] = 1
    image = Image.new("RGB", (100, 100))
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(50):
        _, crop = random_crop(image, labels, (40, 40), 0.75, rng)
        ratios.append(np.bincount(crop.ravel(), minlength=2).max() / crop.size)
    assert np.mean(np.array(ratios) < 0.75) > 0.9  # without the rule, most 40x40 crops hold only class 0


def test_photometric_distortion_is_deterministic_and_keeps_geometry():
    img = photo()
    pmd = PhotoMetricDistortion()
    a = pmd(img, np.random.default_rng(3))
    assert a.size == img.size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(pmd(img, np.random.default_rng(3))))
    changed = [not np.array_equal(np.asarray(pmd(img, np.random.default_rng(s))), np.asarray(img)) for s in range(20)]
    assert sum(changed) >= 17  # all four steps skip with probability 1/16


def test_normalisation_option():
    img = Image.new("RGB", (8, 8), (255, 255, 255))
    std = ClassificationTrain(8, AugmentConfig(normalization="standard", rand_augment=None, color_jitter=None,
                                               reprob=0.0), seed=0)(img, 0, 0)["pixel_values"]
    assert torch.allclose(std, torch.ones_like(std))
    imagenet = ClassificationTrain(8, AugmentConfig(rand_augment=None, color_jitter=None, reprob=0.0), seed=0)
    expect = (1 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(imagenet(img, 0, 0)["pixel_values"][:, 0, 0], expect)
