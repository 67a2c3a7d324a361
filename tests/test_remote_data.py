"""Datasets in object storage: tar shards and image folders read through fsspec from an
S3-compatible server (moto's, started on 127.0.0.1 by the test), giving exactly what the same
files give from the local disk; nothing is written outside the bucket."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from beitdist.data.datasets import ImageFolder, ImageFolderOptions
from beitdist.data.tar_shards import TarShardOptions, TarShards, expand_paths
from beitdist.distributed import free_port
from beitdist.errors import InputError
from tests.test_data_tar_shards import collect, write_shards

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "beitdist-data"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(storage_options, boto3 client) of a fresh bucket on a local moto server."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}, client
    finally:
        server.stop()


def _upload(client, local_root: Path, prefix: str) -> None:
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local_root).as_posix()}")


def test_tar_shards_from_s3_give_the_local_samples_in_the_same_order(s3, tmp_path):
    options, client = s3
    write_shards(tmp_path, 3, 4)
    _upload(client, tmp_path, "shards")
    local = TarShards.build(TarShardOptions(num_classes=10, train=(str(tmp_path / "shard-{000..002}.tar"),)), "train")
    remote = TarShards.build(TarShardOptions(num_classes=10, train=(f"s3://{BUCKET}/shards/shard-{{000..002}}.tar",),
                                             storage_options=options), "train")
    assert remote.shards == [f"s3://{BUCKET}/shards/shard-{i:03d}.tar" for i in range(3)]
    for rank in (0, 1):
        assert collect(remote, rank, 2, 1, epoch=1) == collect(local, rank, 2, 1, epoch=1)
    assert sorted(collect(remote, 0, 1, 2)) == list(range(12))  # 2 loader workers: every sample once
    globbed = expand_paths([f"s3://{BUCKET}/shards/shard-*.tar"], options)
    assert globbed == remote.shards


def test_missing_shards_in_s3_are_named(s3):
    options, _ = s3
    with pytest.raises(InputError) as err:
        expand_paths([f"s3://{BUCKET}/shards/shard-{{000..004}}.tar"], options)
    assert f"s3://{BUCKET}/shards/shard-003.tar" in str(err.value) and "not found" in str(err.value)


def test_image_folder_from_s3_matches_the_local_folder(s3, tmp_path):
    options, client = s3
    root = tmp_path / "folder"
    for split, count in (("train", 3), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i + label, 7, 9)).save(root / split / name / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    _upload(client, root, "folder")
    url = f"s3://{BUCKET}/folder"
    remote_opts = ImageFolderOptions(root=url, storage_options=options)
    local_opts = ImageFolderOptions(root=str(root))
    assert ImageFolder.classes(remote_opts) == ImageFolder.classes(local_opts) == ["cat", "dog"]
    for split in ("train", "val"):
        remote, local = ImageFolder.build(remote_opts, split), ImageFolder.build(local_opts, split)
        assert [os.path.relpath(p, root) for p, _ in local.samples] == [
            p.removeprefix(url + "/") for p, _ in remote.samples]
        for i in range(len(local)):
            got, want = remote[i], local[i]
            assert got["labels"] == want["labels"]
            assert np.array_equal(np.asarray(got["image"]), np.asarray(want["image"]))
    with pytest.raises(InputError, match="split directory .*/test does not exist"):
        ImageFolder.build(ImageFolderOptions(root=url, val_split="test", storage_options=options), "val")


def test_a_recipe_with_an_s3_root_is_not_refused_as_missing_on_this_machine(tmp_path):
    from beitdist.recipe_cli import validate_file

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "runs"), "tracking": {"enabled": False},
                                    "data": {"dataset": "image_folder", "options": {"root": "s3://bucket/imagenet"}}}))
    validate_file(path)  # the workers list the store when they build the loaders
