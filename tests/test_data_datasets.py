"""Built-in map-style datasets: digits split, image folders, ADE20K pairs, corrupt files, label ranges."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beitdist.data.base import CorruptImageError, SkipCorrupt, contract_problems
from beitdist.data.datasets import (
    Ade20k,
    Ade20kOptions,
    Digits,
    DigitsOptions,
    ImageFolder,
    ImageFolderOptions,
    stratified_split,
)
from beitdist.data.tar_shards import TarShards
from beitdist.schema import OptionsError, parse


def photo_crops(count: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    """Real photo content (scikit-learn's bundled china/flower pictures), cropped small."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        out.append(Image.fromarray(photo[top : top + size, left : left + size]))
    return out


def make_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    crops = iter(photo_crops(sum(sum(c.values()) for c in layout.values())))
    for split, classes in layout.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext = "jpg" if i % 2 == 0 else "png"
                next(crops).save(root / split / name / f"{i:03d}.{ext}")
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_plugins_honour_the_contract():
    for plugin in (Digits, ImageFolder, Ade20k, TarShards):
        assert contract_problems(plugin) == []


# ------------------------------------------------------------------------------------- digits
def test_digits_are_scikit_learns_read_without_importing_it():
    """The CSV scikit-learn ships, read directly (importing scikit-learn costs every rank a
    second): the same arrays as `load_digits()`, and no scikit-learn module imported."""
    code = ("import sys; from beitdist.data.datasets import load_digits_arrays; images, labels = load_digits_arrays(); "
            "assert not any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules); "
            "from sklearn.datasets import load_digits; d = load_digits(); import numpy as np; "
            "print(np.array_equal(images, d.images), np.array_equal(labels, d.target), images.dtype, labels.dtype)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "True", "float64", "int64"], done.stderr[-2000:]


def test_digits_split_sizes_and_stratification():
    train = Digits.build(DigitsOptions(), "train")
    val = Digits.build(DigitsOptions(), "val")
    assert len(train) + len(val) == 1797
    assert len(val) == pytest.approx(0.2 * 1797, abs=10)
    assert not set(train.indices) & set(val.indices)
    all_counts = np.bincount(train.labels, minlength=10)
    val_counts = np.bincount(train.labels[val.indices], minlength=10)
    np.testing.assert_allclose(val_counts / all_counts, 0.2, atol=0.01)  # every class split 80/20
    item = train[0]
    assert item["image"].mode == "RGB" and item["image"].size == (8, 8)
    assert np.asarray(item["image"]).max() > 200  # levels 0..16 scaled to 0..255


def test_digits_split_is_deterministic_and_train_fraction_nests():
    a = Digits.build(DigitsOptions(seed=3), "train").indices
    b = Digits.build(DigitsOptions(seed=3), "train").indices
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, Digits.build(DigitsOptions(seed=4), "train").indices)
    small = Digits.build(DigitsOptions(seed=3, train_fraction=0.1), "train")
    assert len(small) == pytest.approx(0.1 * len(a), abs=10)
    assert set(small.indices) <= set(a)
    assert set(np.bincount(small.labels[small.indices])) - {0} and np.bincount(small.labels[small.indices]).min() > 0
    val_small = Digits.build(DigitsOptions(seed=3, train_fraction=0.1), "val").indices
    np.testing.assert_array_equal(val_small, Digits.build(DigitsOptions(seed=3), "val").indices)


def test_digits_options_are_range_checked():
    with pytest.raises(OptionsError, match="data.options.val_fraction"):
        parse(DigitsOptions, {"val_fraction": 1.5}, "data.options")
    labels = np.repeat(np.arange(3), 10)
    train, val = stratified_split(labels, 0.3, seed=0)
    assert np.bincount(labels[val]).tolist() == [3, 3, 3]


# ------------------------------------------------------------------------------- image folder
def test_image_folder_semantics(tmp_path):
    root = make_folder(tmp_path, {"train": {"dog": 3, "cat": 2}, "val": {"cat": 1, "dog": 1}})
    opts = ImageFolderOptions(root=str(root))
    train, val = ImageFolder.build(opts, "train"), ImageFolder.build(opts, "val")
    assert train.classes == ["cat", "dog"] and train.num_classes == 2  # sorted, as torchvision
    assert train.targets == [0, 0, 1, 1, 1]
    assert val.targets == [0, 1]
    item = train[2]
    assert item["labels"] == 1 and item["image"].size == (40, 40) and item["image"].mode == "RGB"


def test_image_folder_errors_name_the_path_and_layout(tmp_path):
    with pytest.raises(ValueError, match=r"root .*nowhere.*/<split>/<class>/<image>"):
        ImageFolder.build(ImageFolderOptions(root=str(tmp_path / "nowhere")), "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no images .*train"):
        ImageFolder.build(ImageFolderOptions(root=str(tmp_path)), "train")
    make_folder(tmp_path, {"train": {"a": 1}})
    with pytest.raises(ValueError, match=r"split directory .*val.* does not exist"):
        ImageFolder.build(ImageFolderOptions(root=str(tmp_path)), "val")
    assert ImageFolder.build(ImageFolderOptions(root=str(tmp_path), val_split=None), "val") is None
    make_folder(tmp_path, {"val": {"zebra": 1}})
    with pytest.raises(ValueError, match="zebra"):
        ImageFolder.build(ImageFolderOptions(root=str(tmp_path)), "val")


# -------------------------------------------------------------------------------------- ADE20K
def make_ade(root: Path, n: int = 3, split: str = "training") -> Path:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(photo_crops(n, size=48, seed=7)):
        crop.save(root / "images" / split / f"ADE_{i:04d}.jpg")
        labels = np.zeros((48, 48), np.uint8)
        labels[:, 16:] = i + 1
        labels[:, 32:] = 150
        Image.fromarray(labels).save(root / "annotations" / split / f"ADE_{i:04d}.png")
    return root


def test_ade20k_pairs_and_reduce_labels(tmp_path):
    make_ade(tmp_path)
    data = Ade20k.build(Ade20kOptions(root=str(tmp_path)), "train")
    assert len(data) == 3
    item = data[1]
    labels = item["labels"]
    assert labels.shape == (48, 48)
    assert set(np.unique(labels)) == {1, 149, 255}  # 0 -> 255 (ignore), 2 -> 1, 150 -> 149
    raw = Ade20k.build(Ade20kOptions(root=str(tmp_path), reduce_labels=False, num_classes=151), "train")[1]["labels"]
    assert set(np.unique(raw)) == {0, 2, 150}


def test_ade20k_mismatched_pairs_are_listed(tmp_path):
    make_ade(tmp_path)
    (tmp_path / "annotations" / "training" / "ADE_0001.png").unlink()
    Image.new("L", (4, 4)).save(tmp_path / "annotations" / "training" / "ADE_9999.png")
    with pytest.raises(ValueError, match=r"ADE_0001.*ADE_9999"):
        Ade20k.build(Ade20kOptions(root=str(tmp_path)), "train")
    with pytest.raises(ValueError, match=r"validation.*images/validation/<name>.jpg"):
        Ade20k.build(Ade20kOptions(root=str(tmp_path)), "val")


def test_ade20k_label_out_of_range_names_file_and_range(tmp_path):
    make_ade(tmp_path, n=1)
    data = Ade20k.build(Ade20kOptions(root=str(tmp_path), num_classes=100), "train")
    with pytest.raises(ValueError, match=r"ADE_0000.png.*\[149\].*\[0, 99\]"):
        data[0]


# ------------------------------------------------------------------------------ corrupt images
def test_truncated_jpeg_stop_names_path_skip_counts(tmp_path, caplog):
    root = make_folder(tmp_path, {"train": {"a": 4}})
    bad = root / "train" / "a" / "002.jpg"
    truncate(bad)
    data = ImageFolder.build(ImageFolderOptions(root=str(root), val_split=None), "train")
    with pytest.raises(CorruptImageError, match="002.jpg") as info:
        data[2]
    assert info.value.path == str(bad) and isinstance(info.value, ValueError)
    with pytest.raises(CorruptImageError, match="002.jpg"):
        SkipCorrupt(data, "stop")[2]

    skipping = SkipCorrupt(data, "skip")
    with caplog.at_level(logging.WARNING):
        first, again = skipping[2], skipping[2]
    np.testing.assert_array_equal(np.asarray(first["image"]), np.asarray(data[3]["image"]))  # the next index
    assert first["index"] == 3
    assert skipping.skipped == 2
    assert sum("002.jpg" in r.getMessage() for r in caplog.records) == 1  # logged once per file
    assert int(skipping[1]["num_skipped"]) == 0 and int(again["num_skipped"]) == 1


def test_skip_wraps_around_and_gives_up_when_nothing_decodes(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 2}})
    for path in (root / "train" / "a").iterdir():
        truncate(path)
    data = SkipCorrupt(ImageFolder.build(ImageFolderOptions(root=str(root), val_split=None), "train"), "skip")
    with pytest.raises(CorruptImageError, match="no sample in reach decodes"):
        data[1]
    with pytest.raises(ValueError, match="on_corrupt"):
        SkipCorrupt(data, "ignore")  # type: ignore[arg-type]
