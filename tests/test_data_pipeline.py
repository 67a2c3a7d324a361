"""build_loaders end to end: batch layouts per task, worker-count independence, resume, corrupt files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beitdist import plugins
from beitdist.data import datasets, tar_shards
from beitdist.data.base import CorruptImageError
from beitdist.data.needs import DataNeeds
from beitdist.data.pipeline import AugmentConfig, CorruptDataError, DataConfig, build_loaders, data_needs
from beitdist.schema import OptionsError
from tests.test_data_datasets import make_ade, make_folder, truncate

DIGITS = {"dataset": "digits", "options": {"train_fraction": 0.1}, "batch_size": 8}


@pytest.fixture(scope="module", autouse=True)
def data_plugins():
    """Register the data plugins unless the manager already has them as built-ins."""
    pm = plugins.get_default_manager()
    added = [plugins.register(m, name=m.__name__) for m in (datasets, tar_shards) if not pm.is_registered(m)]
    yield
    for name in added:
        plugins.unregister(name)


def batches(loader, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_classification_batches_with_mixup_and_eval():
    train, val = build_loaders(DIGITS, "classification", 32, 8, seed=0)
    batch = next(iter(train))
    assert batch.keys() == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (8, 10) and batch["labels"].dtype == torch.float32
    torch.testing.assert_close(batch["labels"].sum(1), torch.ones(8))
    vb = next(iter(val))
    assert vb["labels"].dtype == torch.long and vb["labels"].shape == (8,)
    hard = build_loaders({**DIGITS, "augment": {"mixup": 0.0, "cutmix": 0.0}}, "classification", 32, 8)[0]
    assert next(iter(hard))["labels"].dtype == torch.long


def test_mim_batches_carry_masks_and_tokenizer_view():
    cfg = {**DIGITS, "num_masking_patches": 6}
    train, val = build_loaders(cfg, "mim", 32, 8, seed=1, tokenizer_input_size=16)
    for batch in (next(iter(train)), next(iter(val))):
        assert batch.keys() == {"pixel_values", "tokenizer_pixels", "bool_masked_pos"}
        assert batch["pixel_values"].shape == (8, 3, 32, 32)
        assert batch["tokenizer_pixels"].shape == (8, 3, 16, 16)
        assert 0.0 <= float(batch["tokenizer_pixels"].min()) and float(batch["tokenizer_pixels"].max()) <= 1.0
        mask = batch["bool_masked_pos"]
        assert mask.shape == (8, 16) and mask.dtype == torch.bool
        assert (mask.sum(1) <= 6).all() and mask.sum() > 0
    assert data_needs("mim") == DataNeeds(labels=None, mask=True, tokenizer=True)
    with pytest.raises(ValueError, match="tokenizer_input_size"):
        build_loaders(cfg, "mim", 32, 8)


def test_segmentation_batches(tmp_path):
    make_ade(tmp_path, n=4)
    make_ade(tmp_path, n=2, split="validation")
    cfg = {"dataset": "ade20k", "options": {"root": str(tmp_path)}, "batch_size": 2}
    train, val = build_loaders(cfg, "segmentation", 32, 8)
    for batch in (next(iter(train)), next(iter(val))):
        assert batch["pixel_values"].shape == (2, 3, 32, 32)
        assert batch["labels"].shape == (2, 32, 32) and batch["labels"].dtype == torch.long
        assert set(batch["labels"].unique().tolist()) <= {0, 1, 2, 3, 149, 255}


def test_two_workers_give_the_same_batches_as_none():
    cfg = {**DIGITS, "augment": {"reprob": 1.0}}
    zero = batches(build_loaders({**cfg, "num_workers": 0}, "classification", 32, 8, seed=3)[0], limit=4)
    two = batches(build_loaders({**cfg, "num_workers": 2}, "classification", 32, 8, seed=3)[0], limit=4)
    assert_same(zero, two)


def test_resumed_loader_continues_with_the_same_batches():
    reference, _ = build_loaders(DIGITS, "classification", 32, 8, seed=0)
    reference.set_epoch(2)
    full = batches(reference)
    assert reference.state_dict() == {"epoch": 3, "position": 0}  # a finished pass moves on

    run, _ = build_loaders(DIGITS, "classification", 32, 8, seed=0)
    run.set_epoch(2)
    batches(run, limit=5)
    state = run.state_dict()
    assert state == {"epoch": 2, "position": 40}

    resumed, _ = build_loaders(DIGITS, "classification", 32, 8, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert len(resumed) == len(full) - 5
    assert_same(batches(resumed), full[5:])


def test_corrupt_image_policies_through_workers(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 4, "b": 4}, "val": {"a": 1}})
    truncate(root / "train" / "b" / "002.jpg")
    cfg = {"dataset": "image_folder", "options": {"root": str(root)}, "batch_size": 2, "num_workers": 2,
           "augment": {"mixup": 0.0, "cutmix": 0.0}}
    stop, _ = build_loaders(cfg, "classification", 16, 8)
    with pytest.raises(CorruptImageError, match=r"002.jpg.*\(data.on_corrupt: skip replaces undecodable images"):
        batches(stop)
    skip, _ = build_loaders({**cfg, "on_corrupt": "skip"}, "classification", 16, 8)
    assert sum(len(b["labels"]) for b in batches(skip)) == 8
    assert skip.corrupt_skipped == 1


def test_skipping_stops_when_too_much_of_the_data_is_corrupt(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 100, "b": 100}, "val": {"a": 1}})
    for i in range(0, 100, 10):  # 10 of 200: 5%
        truncate(root / "train" / "a" / f"{i:03d}.jpg")
    cfg = {"dataset": "image_folder", "options": {"root": str(root)}, "batch_size": 20, "on_corrupt": "skip",
           "augment": {"mixup": 0.0, "cutmix": 0.0}}
    strict, _ = build_loaders(cfg, "classification", 16, 8)
    with pytest.raises(CorruptDataError, match=r"data.max_corrupt_fraction: \d+ of the \d+ samples this rank read "
                                               r"\(\d+\.\d%\) failed to decode, more than 1.0%"):
        batches(strict)
    lenient, _ = build_loaders({**cfg, "max_corrupt_fraction": 0.1}, "classification", 16, 8)
    assert sum(len(b["labels"]) for b in batches(lenient)) == 200
    assert lenient.corrupt_skipped == 10 and lenient.samples_read == 210


def test_config_errors_name_the_field():
    with pytest.raises(OptionsError, match="data.batch_size"):
        build_loaders({**DIGITS, "batch_size": 0}, "classification", 32, 8)
    with pytest.raises(OptionsError, match=r"data.options.val_fractoin.*did you mean 'val_fraction'"):
        build_loaders({**DIGITS, "options": {"val_fractoin": 0.1}}, "classification", 32, 8)
    with pytest.raises(OptionsError, match="data.augment.hflip"):
        build_loaders({**DIGITS, "augment": {"hflip": 2}}, "classification", 32, 8)
    with pytest.raises(ValueError, match="unknown dataset 'digit'.*did you mean 'digits'"):
        build_loaders({**DIGITS, "dataset": "digit"}, "classification", 32, 8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_loaders(DIGITS, "classification", 30, 8)
    with pytest.raises(ValueError, match="no rank gets a batch"):
        build_loaders({**DIGITS, "batch_size": 100}, "classification", 32, 8, rank=1, world_size=2)
    with pytest.raises(ValueError, match="unknown head 'detection'"):
        build_loaders(DIGITS, "detection", 32, 8)
    cfg = DataConfig(dataset="digits", augment=AugmentConfig(rand_augment=None))
    assert cfg.val_batch_size is None and cfg.augment.mixup == 0.8 and np.isclose(cfg.mask_ratio, 75 / 196)


def test_tar_shards_through_the_pipeline(tmp_path):
    from tests.test_data_tar_shards import write_shards

    write_shards(tmp_path, 4, 5)
    cfg = {"dataset": "tar_shards", "batch_size": 2, "num_workers": 2, "drop_last": False,
           "options": {"num_classes": 10, "train": [str(tmp_path / "*.tar")], "shuffle_buffer": 3},
           "augment": {"mixup": 0.0, "cutmix": 0.0}}
    per_rank = []
    for rank in range(2):
        train, val = build_loaders(cfg, "classification", 16, 8, rank=rank, world_size=2, seed=0)
        assert val is None
        per_rank.append(sorted(int(v) for b in batches(train) for v in b["labels"]))
    assert sorted(per_rank[0] + per_rank[1]) == sorted(i % 10 for i in range(20))


def test_streaming_rank_without_data_fails_instead_of_spinning(tmp_path):
    from tests.test_data_tar_shards import write_shards

    write_shards(tmp_path, 1, 3)
    cfg = {"dataset": "tar_shards", "batch_size": 2, "augment": {"mixup": 0.0, "cutmix": 0.0},
           "options": {"num_classes": 10, "train": [str(tmp_path / "*.tar")]}}
    train, _ = build_loaders(cfg, "classification", 16, 8, rank=1, world_size=2)
    with pytest.raises(ValueError, match="no batch in epoch 0"):
        batches(train)
