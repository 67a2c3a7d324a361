"""`beitdist.data.processor.ImageProcessor` against transformers' BEiT image processor (PIL backend).

The reference is `transformers.BeitImageProcessorPil` (the torchvision-backed `BeitImageProcessor`
cannot run here). Inputs are real photographs (scikit-learn's two sample JPEGs) plus odd-sized crops
and resizes of them, grey, RGBA and palette versions, as PIL images, numpy arrays and torch tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("sklearn.datasets")

from beitdist.data.processor import ImageProcessor  # noqa: E402

TOL = 1e-5
NEAREST, BILINEAR, BICUBIC = Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC

SETTINGS = {
    "default": {},
    "crop224_from256": dict(size=256, do_center_crop=True, crop_size=224),
    "size384": dict(size={"height": 384, "width": 384}),
    "shortest_edge_crop": dict(size={"shortest_edge": 250}, do_center_crop=True),
    "bilinear_imagenet_norm": dict(
        resample=BILINEAR, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225)
    ),
}


def reference(**kwargs):
    return transformers.BeitImageProcessorPil(**kwargs)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Two 427x640 RGB photos, an odd-sized crop and an odd-sized, partly upsampled resize."""
    china, flower = datasets.load_sample_images().images
    odd_crop = np.ascontiguousarray(china[13:300, 7:512])  # 287 x 505
    odd_resize = np.array(Image.fromarray(flower).resize((217, 333), BICUBIC))  # 333 x 217
    return [china, flower, odd_crop, odd_resize]


def label_map(photo: np.ndarray) -> np.ndarray:
    """Quantised grey levels 0..150, with the brightest pixels marked 255 (ignore) and a block of 0s."""
    grey = np.array(Image.fromarray(photo).convert("L")).astype(np.int64)
    labels = (grey * 151 // 256).astype(np.uint8)
    labels[grey > 235] = 255
    labels[: photo.shape[0] // 8, : photo.shape[1] // 8] = 0
    return labels


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_pixel_values_match_on_photos(photos, setting):
    kwargs = SETTINGS[setting]
    ours = ImageProcessor(**kwargs)
    ref = reference(**kwargs)
    pils = [Image.fromarray(p) for p in photos]
    for image in pils:
        assert_close(ours(image)["pixel_values"], ref(image, return_tensors="pt")["pixel_values"])
    assert_close(ours(pils).pixel_values, ref(pils, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("setting", ["default", "crop224_from256", "size384"])
def test_array_and_tensor_inputs_match(photos, setting):
    kwargs = SETTINGS[setting]
    ours, ref = ImageProcessor(**kwargs), reference(**kwargs)
    hwc = photos[2]
    expected = ref(hwc, return_tensors="pt")["pixel_values"]
    chw_tensor = torch.from_numpy(hwc).permute(2, 0, 1)
    for image in (hwc, torch.from_numpy(hwc), chw_tensor, chw_tensor.float(), Image.fromarray(hwc)):
        assert_close(ours(image)["pixel_values"], expected)
    batch = np.stack([photos[0], photos[1]])  # (B, H, W, C) counts as a batch, as in transformers
    assert_close(ours(batch)["pixel_values"], ref(batch, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("setting", ["default", "crop224_from256", "size384"])
def test_grey_rgba_and_palette_converted_like_transformers(photos, setting):
    kwargs = SETTINGS[setting]
    ours, ref = ImageProcessor(**kwargs), reference(do_convert_rgb=True, **kwargs)
    photo = photos[3]
    alpha = np.broadcast_to(np.linspace(0, 255, photo.shape[1]).astype(np.uint8), photo.shape[:2])
    rgba = np.dstack([photo, alpha])
    grey = np.array(Image.fromarray(photo).convert("L"))
    cases = [
        (Image.fromarray(photo).convert("L"), Image.fromarray(photo).convert("L")),
        (Image.fromarray(rgba), Image.fromarray(rgba)),  # PIL: alpha-composited onto white by PIL
        (rgba, rgba),  # numpy: composited in float and rounded, which can differ from PIL by 1
        (Image.fromarray(photo).convert("P"), Image.fromarray(photo).convert("P")),
        (Image.fromarray(photo).convert("LA"), Image.fromarray(photo).convert("LA")),
        (grey, grey[..., None]),  # transformers refuses 2-D arrays; (H, W, 1) is the same image
        (torch.from_numpy(grey), grey[..., None]),
    ]
    for ours_input, ref_input in cases:
        assert_close(ours(ours_input)["pixel_values"], ref(ref_input, return_tensors="pt")["pixel_values"])


def test_float_images_follow_transformers(photos):
    """Floats in [0, 1] are quantised through PIL like transformers; do_rescale=True then scales twice."""
    image = photos[2].astype(np.float32) / 255
    for kwargs in ({}, dict(do_rescale=False), dict(do_resize=False, do_center_crop=True)):
        ours = ImageProcessor(**kwargs)(image)["pixel_values"]
        assert_close(ours, reference(**kwargs)(image, return_tensors="pt")["pixel_values"])


def test_center_crop_pads_small_images_like_transformers(photos):
    small = photos[0][:100, :301]
    kwargs = dict(do_resize=False, do_center_crop=True, crop_size={"height": 151, "width": 224})
    ours = ImageProcessor(**kwargs)(small)["pixel_values"]
    assert_close(ours, reference(**kwargs)(small, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("setting", ["default", "crop224_from256", "size384"])
def test_labels_match_transformers(photos, setting, reduce):
    kwargs = dict(SETTINGS[setting], do_reduce_labels=reduce)
    images = [Image.fromarray(p) for p in photos]
    maps = [label_map(p) for p in photos]
    inputs = [Image.fromarray(maps[0]), maps[1], torch.from_numpy(maps[2]).long(), maps[3].astype(np.int32)]

    # NEAREST (our default) against transformers told to use NEAREST throughout.
    ours = ImageProcessor(**kwargs)(images, segmentation_maps=inputs)
    theirs = reference(**kwargs, resample=NEAREST)(images, segmentation_maps=maps, return_tensors="pt")
    assert ours["labels"].dtype == torch.int64 and ours["labels"].shape == theirs["labels"].shape
    assert torch.equal(ours["labels"], theirs["labels"])
    allowed = set(np.unique(np.concatenate([m.ravel() for m in maps])).tolist())
    if reduce:
        allowed = {255 if v in (0, 255) else v - 1 for v in allowed}
    assert set(ours["labels"].unique().tolist()) <= allowed  # no invented class ids
    assert_close(ours["pixel_values"], reference(**kwargs)(images, return_tensors="pt")["pixel_values"])

    # label_resample=None reproduces transformers 5.x exactly: label maps resized with the image filter.
    ours = ImageProcessor(**kwargs, label_resample=None)(images, segmentation_maps=inputs)
    theirs = reference(**kwargs)(images, segmentation_maps=[m.copy() for m in maps], return_tensors="pt")
    assert torch.equal(ours["labels"], theirs["labels"])


def test_reduce_labels_rule_and_no_mutation():
    labels = np.array([[0, 1, 2], [150, 254, 255]], dtype=np.uint8)
    before = labels.copy()
    out = ImageProcessor(do_resize=False, do_reduce_labels=True)(np.zeros((2, 3, 3), np.uint8), labels)["labels"]
    assert out.tolist() == [[[255, 0, 1], [149, 253, 255]]]
    np.testing.assert_array_equal(labels, before)  # transformers edits a numpy map in place; we do not


def test_output_container_and_per_call_overrides(photos):
    proc = ImageProcessor()
    out = proc(photos[:2], return_tensors="np", size=64)
    assert isinstance(out.pixel_values, np.ndarray) and out.pixel_values.shape == (2, 3, 64, 64)
    assert proc.size == {"height": 224, "width": 224}  # a call's overrides do not stick
    unstacked = proc(photos[:2], return_tensors=None, size={"shortest_edge": 50})["pixel_values"]
    assert [a.shape for a in unstacked] == [(3, 50, 74), (3, 50, 74)]
    config = reference(size=320).to_dict()
    assert ImageProcessor.from_dict(config).size == {"height": 320, "width": 320}


@pytest.mark.parametrize("target_sizes", [None, [(427, 640), (33, 17)], torch.tensor([[60, 61], [224, 224]])])
def test_post_process_semantic_segmentation_matches(target_sizes):
    gen = torch.Generator().manual_seed(0)
    outputs = SimpleNamespace(logits=torch.randn(2, 7, 14, 14, generator=gen))
    ours = ImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
    # transformers 5.24 turns a tensor of sizes into a numpy array that F.interpolate then rejects.
    ref_sizes = target_sizes.tolist() if isinstance(target_sizes, torch.Tensor) else target_sizes
    theirs = reference().post_process_semantic_segmentation(outputs, target_sizes=ref_sizes)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == torch.int64 and torch.equal(a, b)


BAD_IMAGES = {
    "path string": ("photo.jpg", r"got str; expected a PIL.Image.Image"),
    "int": (42, r"got int; expected"),
    "empty list": ([], r"got an empty list; expected"),
    "list with a None": ([np.zeros((8, 8, 3), np.uint8), None], r"got NoneType"),
    "two channels": (np.zeros((8, 9, 2), np.uint8), r"channel axis of size 1, 3 or 4 in shape \(8, 9, 2\)"),
    "five channels": (np.zeros((5, 8, 9), np.uint8), r"channel axis of size 1, 3 or 4 in shape \(5, 8, 9\)"),
    "five dims": (np.zeros((1, 1, 3, 8, 8), np.uint8), r"shape \(1, 1, 3, 8, 8\); expected"),
    "1-D": (np.zeros(8, np.uint8), r"shape \(8,\); expected"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_raise_value_error(case):
    image, message = BAD_IMAGES[case]
    with pytest.raises(ValueError, match=message):
        ImageProcessor()(image)


def test_other_bad_inputs_raise_value_error(photos):
    proc, image = ImageProcessor(), photos[3]
    with pytest.raises(ValueError, match=r"got 1 channels .* do_convert_rgb=True"):
        proc(np.array(Image.fromarray(image).convert("L")), do_convert_rgb=False)
    with pytest.raises(ValueError, match=r"2-D \(H, W\) array of class ids; got \(333, 217, 3\)"):
        proc(image, segmentation_maps=Image.fromarray(image))
    with pytest.raises(ValueError, match=r"got 2 images but 1 segmentation maps"):
        proc([image, image], segmentation_maps=label_map(image))
    with pytest.raises(ValueError, match=r"values in \[0, 300\] \(int64\).*integers in \[0, 255\]"):
        proc(image, segmentation_maps=np.linspace(0, 300, image.size // 3).astype(np.int64).reshape(image.shape[:2]))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['do_resise'\]"):
        proc(image, do_resise=False)
    with pytest.raises(ValueError, match=r"size must be an int, a \(height, width\) pair or a dict"):
        ImageProcessor(size={"height": 224})
    with pytest.raises(ValueError, match=r"image_mean must be one number or one per RGB channel"):
        proc(image, image_mean=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"different sizes and cannot be stacked"):
        proc([photos[0], photos[3]], size={"shortest_edge": 100})
    with pytest.raises(ValueError, match=r"got 1 target sizes for a batch of 2"):
        proc.post_process_semantic_segmentation(SimpleNamespace(logits=torch.zeros(2, 3, 4, 4)), [(8, 8)])
