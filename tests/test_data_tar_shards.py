"""Tar shards: exactly-once coverage across ranks x workers, per-epoch reshuffle, corrupt samples."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from beitdist.data.base import CorruptImageError
from beitdist.data.tar_shards import TarShardDataset, TarShardOptions, TarShards, expand_paths, iter_tar_samples
from beitdist.schema import OptionsError, parse


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, num_shards: int, per_shard: int, *, corrupt: set[int] = frozenset(),
                 label_of=lambda i: i % 10) -> list[int]:
    ids = []
    for s in range(num_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for k in range(per_shard):
                i = s * per_shard + k
                ids.append(i)
                image = _png(i)[:20] if i in corrupt else _png(i)
                for name, data in ((f"{i:06d}.png", image), (f"{i:06d}.cls", str(label_of(i)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return ids


def red_value(item) -> int:
    return int(np.asarray(item["image"])[0, 0, 0])


def collect(dataset: TarShardDataset, rank: int, world: int, workers: int, epoch: int = 0) -> list[int]:
    dataset.set_distributed(rank, world, seed=5)
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=lambda item: item)
    return [red_value(item) for item in loader]


def test_samples_group_members_by_basename(tmp_path):
    write_shards(tmp_path, 1, 3)
    samples = list(iter_tar_samples(str(tmp_path / "shard-000.tar")))
    assert [key for key, _ in samples] == ["000000", "000001", "000002"]
    assert set(samples[0][1]) == {"png", "cls"}


def test_every_sample_once_across_2_ranks_x_2_workers(tmp_path):
    ids = write_shards(tmp_path, 8, 5)
    shards = expand_paths([str(tmp_path / "shard-{000..007}.tar")])
    assert len(shards) == 8
    seen = []
    per_rank = []
    for rank in range(2):
        got = collect(TarShardDataset(shards, 10, shuffle=True, shuffle_buffer=4), rank, 2, workers=2)
        per_rank.append(got)
        seen += got
    assert sorted(seen) == ids  # each exactly once
    assert len(per_rank[0]) == len(per_rank[1]) == 20


def test_epochs_reshuffle_and_runs_repeat(tmp_path):
    write_shards(tmp_path, 4, 6)
    shards = expand_paths([str(tmp_path / "*.tar")])
    make = lambda: TarShardDataset(shards, 10, shuffle=True, shuffle_buffer=8)  # noqa: E731
    e0 = collect(make(), 0, 1, workers=0, epoch=0)
    assert collect(make(), 0, 1, workers=0, epoch=0) == e0  # deterministic
    e1 = collect(make(), 0, 1, workers=0, epoch=1)
    assert sorted(e1) == sorted(e0) and e1 != e0
    unshuffled = collect(TarShardDataset(shards, 10, shuffle=False), 0, 1, workers=0)
    assert unshuffled == sorted(unshuffled)


def test_fewer_shards_than_workers_warns_and_still_covers(tmp_path, caplog):
    ids = write_shards(tmp_path, 2, 3)
    shards = expand_paths([str(tmp_path / "*.tar")])
    ds = TarShardDataset(shards, 10, shuffle=False)
    with caplog.at_level("WARNING"):
        ds.set_distributed(0, 2, seed=0)
        parts = [ds.shards_for(w, 2) for w in range(2)]
    ds.set_distributed(1, 2, seed=0)
    parts += [ds.shards_for(w, 2) for w in range(2)]
    assert sorted(p for part in parts for p, _ in part) == [0, 1]
    assert [len(p) for p in parts].count(0) == 2
    assert "get no shard" in caplog.text
    assert len(ids) == 6


def test_corrupt_sample_stop_and_skip(tmp_path):
    write_shards(tmp_path, 1, 4, corrupt={2})
    shards = expand_paths([str(tmp_path / "*.tar")])
    ds = TarShardDataset(shards, 10, shuffle=False)
    with pytest.raises(CorruptImageError, match=r"shard-000.tar:000002.png"):
        list(ds)
    ds.on_corrupt = "skip"
    assert [red_value(item) for item in ds] == [0, 1, 3]
    assert ds.skipped == 1
    counted = TarShardDataset(shards, 10, transform=lambda img, label, idx: {"labels": torch.tensor(label)},
                              shuffle=False, on_corrupt="skip")
    assert [int(item["num_skipped"]) for item in counted] == [0, 0, 1]  # carried by the next sample


def test_label_out_of_range_names_sample_and_range(tmp_path):
    write_shards(tmp_path, 1, 3, label_of=lambda i: 12 if i == 1 else 0)
    ds = TarShardDataset(expand_paths([str(tmp_path / "*.tar")]), 10, shuffle=False, on_corrupt="skip")
    with pytest.raises(ValueError, match=r"shard-000.tar:000001.cls: label 12 .*\[0, 9\]"):
        list(ds)


def test_options_and_missing_shards(tmp_path):
    with pytest.raises(OptionsError, match="data.options.train"):
        parse(TarShardOptions, {"num_classes": 10}, "data.options")
    with pytest.raises(ValueError, match=r"not found.*nothing-\*.tar"):
        TarShards.build(TarShardOptions(num_classes=10, train=(str(tmp_path / "nothing-*.tar"),)), "train")
    assert TarShards.build(TarShardOptions(num_classes=10, train=("x",)), "val") is None


def test_shuffle_buffer_holds_encoded_samples(tmp_path):
    """The buffer is filled with the files' bytes: the first item is transformed alone, not after
    transforming a whole buffer (memory and time to the first batch), and still every sample once."""
    write_shards(tmp_path, 2, 10)
    calls = []

    def transform(image, label, sample_id):
        calls.append(sample_id)
        return {"pixel_values": torch.tensor(np.asarray(image)[0, 0, 0]), "labels": torch.tensor(label)}

    dataset = TarShardDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), 10, transform, shuffle_buffer=8, seed=3)
    stream = iter(dataset)
    first = next(stream)
    assert len(calls) == 1
    values = [int(first["pixel_values"])] + [int(item["pixel_values"]) for item in stream]
    assert sorted(values) == list(range(20)) and values != list(range(20))
